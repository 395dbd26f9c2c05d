package tasks

import (
	"encoding/json"
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/hibiken/asynq"

	"github.com/couponflow/dispatcher/internal/ratelimit"
	"github.com/couponflow/dispatcher/internal/wechat"
)

func coupon() SendCoupon {
	return SendCoupon{
		Common: Common{V: Version, Campaign: "spring-2026", MchID: "1900000001", OpenID: "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o",
			StockID: "9856000", OutRequestNo: "1900000001-abc", AppID: "wx233544546545989", Deadline: time.Unix(2e9, 0).UTC()},
		StockCreatorMchID: "1900000001",
	}
}

func TestNewTaskCarriesIDQueueAndRetryBound(t *testing.T) {
	task, err := NewTask(coupon())
	if err != nil {
		t.Fatal(err)
	}
	if task.Type() != TypeSendCoupon {
		t.Fatalf("type %q", task.Type())
	}
	args, err := Decode(task)
	if err != nil {
		t.Fatal(err)
	}
	if args.(SendCoupon) != coupon() {
		t.Fatalf("round trip changed the payload: %+v", args)
	}
	var raw map[string]any
	json.Unmarshal(task.Payload(), &raw)
	for _, k := range []string{"v", "campaign", "mchid", "openid", "stock_id", "out_request_no", "appid", "stock_creator_mchid", "deadline"} {
		if _, ok := raw[k]; !ok {
			t.Errorf("payload lacks %q: %s", k, task.Payload())
		}
	}
	if got := coupon().Key().TaskID(); got != "send:1900000001:1900000001.abc" {
		t.Fatalf("task id %q", got)
	}
}

func TestNewTaskRefusesBadFieldsByName(t *testing.T) {
	cases := map[string]func(*SendCoupon){
		"openid":         func(a *SendCoupon) { a.OpenID = "has space" },
		"out_request_no": func(a *SendCoupon) { a.OutRequestNo = strings.Repeat("x", 129) },
		"stock_id":       func(a *SendCoupon) { a.StockID = "" },
		"campaign":       func(a *SendCoupon) { a.Campaign = "no spaces please" },
		"version":        func(a *SendCoupon) { a.V = 2 },
		"deadline":       func(a *SendCoupon) { a.Deadline = time.Time{} },
		"coupon_minimum": func(a *SendCoupon) { a.CouponValue, a.CouponMinimum = 500, 100 },
		"appid":          func(a *SendCoupon) { a.AppID = "" },
	}
	for field, mutate := range cases {
		a := coupon()
		mutate(&a)
		_, err := NewTask(a)
		if err == nil || !strings.Contains(err.Error(), field) {
			t.Errorf("%s: %v", field, err)
		}
	}
}

func TestDecodeRefusesUnknownAndBrokenPayloads(t *testing.T) {
	if _, err := Decode(asynq.NewTask("coupon:other", nil)); err == nil {
		t.Error("unknown type decoded")
	}
	if _, err := Decode(asynq.NewTask(TypeSendCoupon, []byte("{"))); err == nil {
		t.Error("broken JSON decoded")
	}
	old := coupon()
	old.V = 0
	b, _ := json.Marshal(old)
	if _, err := Decode(asynq.NewTask(TypeSendCoupon, b)); err == nil || !strings.Contains(err.Error(), "version") {
		t.Errorf("version 0: %v", err)
	}
}

func TestDeriveOutRequestNo(t *testing.T) {
	a := DeriveOutRequestNo("1900000001", "spring", "o1")
	if a != DeriveOutRequestNo("1900000001", "spring", "o1") {
		t.Fatal("not deterministic")
	}
	for _, other := range []string{
		DeriveOutRequestNo("1900000002", "spring", "o1"),
		DeriveOutRequestNo("1900000001", "summer", "o1"),
		DeriveOutRequestNo("1900000001", "spring", "o2"),
		// The separator keeps field boundaries: "ab"+"c" is not "a"+"bc".
		DeriveOutRequestNo("1900000001", "sprin", "go1"),
	} {
		if other == a {
			t.Fatalf("collision: %s", a)
		}
	}
	if err := wechat.ValidateOutRequestNo(a); err != nil || len(a) > 128 {
		t.Fatalf("%q: %v", a, err)
	}
	if !regexp.MustCompile(`^1900000001-[0-9a-f]{32}$`).MatchString(a) {
		t.Fatalf("shape %q", a)
	}
}

func TestMultiusePayloadHoldsCiphertextOnly(t *testing.T) {
	a := SendMultiuse{Common: coupon().Common, Amount: 5000, CardType: "ID_CARD",
		Identity: wechat.EncryptedIdentity{UserName: "Y2lwaGVy", IDCardNumber: "Y2lwaGVyMg==", KeyID: "PUB_KEY_ID_1"}}
	task, err := NewTask(a)
	if err != nil {
		t.Fatal(err)
	}
	var raw map[string]any
	json.Unmarshal(task.Payload(), &raw)
	ident := raw["identity"].(map[string]any)
	if ident["user_name"] != "Y2lwaGVy" || ident["key_id"] != "PUB_KEY_ID_1" || raw["user_name"] != nil {
		t.Fatalf("payload %s", task.Payload())
	}
	a.Identity.KeyID = ""
	if _, err := NewTask(a); err == nil {
		t.Fatal("an identity without its key id was accepted")
	}
}

func TestShardQueueSpreadsAndIsStable(t *testing.T) {
	if ShardQueue("coupons", 1, "x") != "coupons" || len(ShardQueues("coupons", 0)) != 1 {
		t.Fatal("one shard must be the queue itself")
	}
	names := map[string]bool{}
	for _, q := range ShardQueues("coupons", 4) {
		names[q] = true
	}
	seen := map[string]int{}
	for i := 0; i < 4000; i++ {
		key := DeriveOutRequestNo("1900000001", "c", fmt.Sprint("o", i))
		q := ShardQueue("coupons", 4, key)
		if q != ShardQueue("coupons", 4, key) || !names[q] {
			t.Fatalf("%s → %s", key, q)
		}
		seen[q]++
	}
	for q, n := range seen {
		if n < 800 {
			t.Errorf("queue %s got %d of 4000", q, n)
		}
	}
	if len(seen) != 4 {
		t.Fatalf("used %d of 4 queues", len(seen))
	}
}

// A consumer-fund send may leave its amount to a stock with a fixed
// amount: 0 is left out of the payload (and of the call).
func TestMultiuseAmountMayBeLeftToTheStock(t *testing.T) {
	a := SendMultiuse{Common: coupon().Common, CardType: "ID_CARD",
		Identity: wechat.EncryptedIdentity{UserName: "Y2lwaGVy", IDCardNumber: "Y2lwaGVyMg==", KeyID: "PUB_KEY_ID_1"}}
	task, err := NewTask(a)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(task.Payload()), `"amount"`) {
		t.Fatalf("payload %s", task.Payload())
	}
	for field, mutate := range map[string]func(*SendMultiuse){
		"amount":    func(a *SendMultiuse) { a.Amount = -1 },
		"card_type": func(a *SendMultiuse) { a.CardType = "PASSPORT" },
	} {
		b := a
		mutate(&b)
		if _, err := NewTask(b); err == nil || !strings.Contains(err.Error(), field) {
			t.Errorf("%s: %v", field, err)
		}
	}
}

// asynqmon shows an id up to its first "-": a send's id has none, and
// names its send both ways, whatever WeChat's charset allows.
func TestTaskIDShownWholeAndParsed(t *testing.T) {
	for _, no := range []string{"1900000001-4f3a9c", "a-b-c", "A_b|c*d", "x", strings.Repeat("-", 128)} {
		k := Key{MchID: "1900000001", OutRequestNo: no}
		id := k.TaskID()
		if strings.Contains(id, "-") {
			t.Errorf("%q: task id %q has a '-': asynqmon would cut it", no, id)
		}
		if got, ok := ParseTaskID(id); !ok || got != k {
			t.Errorf("ParseTaskID(%q) = %+v, %v; want %+v", id, got, ok, k)
		}
	}
	for _, id := range []string{"", "send:", "send:1900", "send::x", "notify:1900:x"} {
		if _, ok := ParseTaskID(id); ok {
			t.Errorf("ParseTaskID(%q) accepted", id)
		}
	}
}

// A kept cash-coupon task is slim, short enough for a listpack hash, and
// gives back the very bytes Keep does; a task whose slim form would not
// is kept whole.
func TestKeepSlim(t *testing.T) {
	shanghai := time.FixedZone("CST", 8*3600)
	valued := coupon()
	valued.CouponValue, valued.CouponMinimum = 100000, 1000000
	nanos := coupon()
	nanos.Deadline = time.Date(2027, 1, 2, 3, 4, 5, 123456789, shanghai)
	local := coupon()
	local.Deadline = time.Unix(2e9, 0).In(shanghai)
	multi := SendMultiuse{Common: coupon().Common, CardType: "ID_CARD",
		Identity: wechat.EncryptedIdentity{UserName: "Y2lwaGVy", IDCardNumber: "Y2lwaGVyMg==", KeyID: "PUB_KEY_ID_1"}}
	for _, tc := range []struct {
		name string
		args Args
		slim bool
	}{
		{"coupon", coupon(), true},
		{"value and minimum", valued, true},
		{"deadline with nanoseconds and an offset", nanos, true},
		{"deadline in a named zone", local, true},
		{"a payload that is not the args' own encoding", coupon(), false},
		{"multiuse", multi, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			task, err := NewTask(tc.args)
			if err != nil {
				t.Fatal(err)
			}
			if strings.HasPrefix(tc.name, "a payload") {
				task = asynq.NewTask(task.Type(), append([]byte(" "), task.Payload()...))
			}
			kept := KeepSlim(tc.args, task)
			if isSlim := !strings.Contains(string(kept), "\n"); isSlim != tc.slim {
				t.Fatalf("slim %v, want %v: %q", isSlim, tc.slim, kept)
			}
			// Nanoseconds, a named zone, a coupon value: still a listpack.
			if tc.slim && len(kept) > 64 {
				t.Errorf("%d bytes, over hash-max-listpack-value: %q", len(kept), kept)
			}
			c := tc.args.Base()
			full, err := Unslim(kept, c.Campaign, c.MchID, c.OpenID, c.StockID, c.OutRequestNo)
			if err != nil {
				t.Fatal(err)
			}
			if string(full) != string(Keep(task)) {
				t.Errorf("unslimmed %q\nkept      %q", full, Keep(task))
			}
		})
	}
	for _, bad := range []string{"1|wx", "x|wx|1796322699@0|1900|0|0", "1|wx|tomorrow|1900|0|0", "1|wx|2027-01-02T03:04:05Z|1900|0|0",
		"1|wx|1796322699@0|1900|a|0", "1|wx|1796322699.x@0|1900|0|0"} {
		if _, err := Unslim([]byte(bad), "c", "m", "o", "s", "r"); err == nil {
			t.Errorf("%q unslimmed", bad)
		}
	}
}

// BenchmarkDecode is what a worker spends on a task before its call:
// the payload decoded and every field checked.
func BenchmarkDecode(b *testing.B) {
	task, err := NewTask(coupon())
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Decode(task); err != nil {
			b.Fatal(err)
		}
	}
}

func TestValidateCampaign(t *testing.T) {
	for name, ok := range map[string]bool{
		"spring-2026":           true,
		"a.b_c-D9":              true,
		strings.Repeat("c", 64): true,
		strings.Repeat("c", 65): false,
		"":                      false,
		"a b":                   false,
		"{spring}":              false,
		"spring:1":              false,
		"春":                     false,
	} {
		if err := ValidateCampaign(name); (err == nil) != ok {
			t.Errorf("ValidateCampaign(%q) = %v, want ok %v", name, err, ok)
		}
	}
}

// Every kind is described once, in Kinds: its payload decodes back to the
// same send, and its endpoint has a rate limit.
func TestEveryKindDescribed(t *testing.T) {
	sends := []Args{coupon(), SendMultiuse{Common: coupon().Common, Amount: 5000, CardType: "ID_CARD",
		Identity: wechat.EncryptedIdentity{UserName: "Y2lwaGVy", IDCardNumber: "Y2lwaGVyMg==", KeyID: "PUB_KEY_ID_1"}}}
	if len(sends) != len(Kinds) {
		t.Fatalf("%d kinds, %d sends here: add the new kind's send to this test", len(Kinds), len(sends))
	}
	for i, a := range sends {
		k, ok := KindOf(a.Kind())
		if !ok || k.Type != Kinds[i].Type {
			t.Fatalf("%T: KindOf(%q) = %v, %v", a, a.Kind(), k.Type, ok)
		}
		if _, ok := ratelimit.Defaults[k.Endpoint]; !ok {
			t.Errorf("%s: endpoint %q has no rate limit", k.Type, k.Endpoint)
		}
		if Endpoints()[i] != k.Endpoint {
			t.Errorf("Endpoints()[%d] = %q, want %q", i, Endpoints()[i], k.Endpoint)
		}
		task, err := NewTask(a)
		if err != nil {
			t.Fatal(err)
		}
		back, err := Decode(task)
		if err != nil {
			t.Fatal(err)
		}
		if fmt.Sprintf("%#v", back) != fmt.Sprintf("%#v", a) {
			t.Errorf("%s decoded as\n%#v\nwant\n%#v", k.Type, back, a)
		}
	}
}
