package keyspace

import (
	"strings"
	"testing"
)

// slot is Redis Cluster's key slot: CRC16 (XMODEM) of the hash tag, or of
// the whole key when it has none, modulo 16384.
func slot(key string) int {
	if s := strings.IndexByte(key, '{'); s >= 0 {
		if e := strings.IndexByte(key[s+1:], '}'); e > 0 {
			key = key[s+1 : s+1+e]
		}
	}
	var crc uint16
	for i := 0; i < len(key); i++ {
		crc ^= uint16(key[i]) << 8
		for b := 0; b < 8; b++ {
			if crc&0x8000 != 0 {
				crc = crc<<1 ^ 0x1021
			} else {
				crc <<= 1
			}
		}
	}
	return int(crc) % 16384
}

func TestSlotMatchesRedis(t *testing.T) {
	// Values from CLUSTER KEYSLOT on a real cluster.
	for key, want := range map[string]int{"foo": 12182, "bar": 5061, "{user1000}.following": 3443,
		"{user1000}.followers": 3443, "foo{}{bar}": 8363, "foo{{bar}}zap": 4015, "foo{bar}{zap}": 5061} {
		if got := slot(key); got != want {
			t.Errorf("slot(%q) = %d, want %d", key, got, want)
		}
	}
}

func TestLayout(t *testing.T) {
	for _, tc := range []struct {
		keys Keys
		name string
		got  string
		want string
		tag  string // the hash tag the key must carry
	}{
		{Default, "record", Default.Record("spring", "1900", "1900-ab"), "cf:{spring}:send:1900:1900-ab", "spring"},
		{Default, "counts", Default.Counts("spring"), "cf:{spring}:counts", "spring"},
		{Default, "members", Default.Members("spring"), "cf:{spring}:members", "spring"},
		{Default, "rate", Default.Rate("spring", 1700000000), "cf:{spring}:rate:1700000000", "spring"},
		{Default, "meta", Default.Meta("spring"), "cf:{spring}:meta", "spring"},
		{Default, "tomb", Default.Tomb("spring"), "cf:{spring}:tomb", "spring"},
		{Default, "coupons", Default.Coupons("spring"), "cf:{spring}:coupons", "spring"},
		{Default, "redeem seen", Default.RedeemSeen("EV-1"), "cf:redeem:seen:{EV-1}", "EV-1"},
		{Default, "redeem nonce", Default.RedeemNonce("n1"), "cf:redeem:nonce:{n1}", "n1"},
		{Default, "redeem stats", Default.RedeemStats(), "cf:redeem:stats", ""},
		{Default, "campaigns", Default.Campaigns(), "cf:campaigns", ""},
		{Default, "user lock", Default.UserLock("1900", "oU1"), "cf:user:{1900:oU1}", "1900:oU1"},
		{Default, "breaker", Default.Breaker("1900", "160001"), "cf:breaker:{1900}:stock:160001", "1900"},
		{Default, "open breakers", Default.OpenBreakers("1900"), "cf:breaker:{1900}:open", "1900"},
		{Default, "limiter", Default.Limiter("1900", "favor_send"), "cf:rl:{1900:favor_send}", "1900:favor_send"},
		{Default, "limiter rate", Default.LimiterRate("1900", "favor_send"), "cf:rl:{1900:favor_send}:aimd", "1900:favor_send"},
		{Default, "lock", Default.Lock("retention"), "cf:lock:retention", ""},
		{Default, "swept", Default.Swept(), "cf:sweep:swept", ""},
		{Default, "replica ack", Default.ReplicaAck(), "cf:replica-ack", ""},
		{Default, "replica ack on a master", Default.ReplicaAckTagged(7), "cf:replica-ack:{7}", "7"},
		{Keys{}, "zero value", Keys{}.Counts("a"), "cf:{a}:counts", "a"},
		{New("cf:"), "trailing colon", New("cf:").Meta("a"), "cf:{a}:meta", "a"},
		{New("acme"), "prefix", New("acme").Record("a", "m", "o"), "acme:{a}:send:m:o", "a"},
		{New("acme"), "prefix breaker", New("acme").Breaker("m", "s"), "acme:breaker:{m}:stock:s", "m"},
		{New("acme"), "prefix limiter", New("acme").LimiterRate("m", "e"), "acme:rl:{m:e}:aimd", "m:e"},
	} {
		if tc.got != tc.want {
			t.Errorf("%s: %q, want %q", tc.name, tc.got, tc.want)
		}
		if !tc.keys.Owns(tc.got) {
			t.Errorf("%s: %q is outside prefix %q", tc.name, tc.got, tc.keys.Prefix())
		}
		wantSlot := slot(tc.got)
		if tc.tag != "" {
			wantSlot = slot(tc.tag)
		}
		if slot(tc.got) != wantSlot || (tc.tag == "") != !strings.Contains(tc.got, "{") {
			t.Errorf("%s: %q does not carry the tag {%s}", tc.name, tc.got, tc.tag)
		}
	}
}

func TestSlots(t *testing.T) {
	k := Default
	// Every key of one campaign on one slot, whatever the send.
	camp := []string{k.Record("spring", "1900", "x1"), k.Record("spring", "1901", "y"), k.Counts("spring"),
		k.Members("spring"), k.Rate("spring", 1), k.Meta("spring"), k.Tomb("spring"), k.Coupons("spring")}
	for _, key := range camp {
		if slot(key) != slot(camp[0]) {
			t.Errorf("%q is on slot %d, the campaign on %d", key, slot(key), slot(camp[0]))
		}
		if !strings.HasPrefix(key, strings.TrimSuffix(k.CampaignPattern("spring"), "*")) {
			t.Errorf("%q does not match the campaign pattern", key)
		}
	}
	// A breaker and its merchant's open set on one slot; another merchant's elsewhere.
	if slot(k.Breaker("1900", "s1")) != slot(k.OpenBreakers("1900")) || slot(k.Breaker("1900", "s2")) != slot(k.OpenBreakers("1900")) {
		t.Error("breaker and open set on different slots")
	}
	if slot(k.Limiter("1900", "favor_send")) != slot(k.LimiterRate("1900", "favor_send")) {
		t.Error("limiter keys on different slots")
	}
	// Spread: campaigns, users and limits do not all land on one slot.
	for _, pair := range [][2]string{
		{k.Counts("spring"), k.Counts("autumn")},
		{k.UserLock("1900", "oA"), k.UserLock("1900", "oB")},
		{k.Limiter("1900", "favor_send"), k.Limiter("1900", "multiuse_send")},
		{k.OpenBreakers("1900"), k.OpenBreakers("1901")},
		{k.UserLock("1900", "oA"), k.Counts("spring")},
	} {
		if slot(pair[0]) == slot(pair[1]) {
			t.Errorf("%q and %q share slot %d", pair[0], pair[1], slot(pair[0]))
		}
	}
	// A campaign pattern does not match a campaign whose name extends it.
	if strings.HasPrefix(k.Counts("spring2"), strings.TrimSuffix(k.CampaignPattern("spring"), "*")) {
		t.Error("campaign pattern of spring matches spring2")
	}
}

func TestValidate(t *testing.T) {
	for _, ok := range []string{"cf", "cf:", "acme-prod", "a.b_c"} {
		if err := Validate(ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, bad := range []string{"", ":", "a{b}", "a b", "a:b", strings.Repeat("x", 33)} {
		if Validate(bad) == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// asynq's keys are asynq's layout (asynq/internal/base); a queue's task
// hashes and its pending list share the queue's slot, so one script may
// write both.
func TestAsynqLayout(t *testing.T) {
	for got, want := range map[string]string{
		AsynqQueues():                    "asynq:queues",
		AsynqTask("coupons", "send:1:x"): "asynq:{coupons}:t:send:1:x",
		AsynqPending("coupons-3"):        "asynq:{coupons-3}:pending",
	} {
		if got != want {
			t.Errorf("%q, want %q", got, want)
		}
	}
	if slot(AsynqTask("coupons", "a")) != slot(AsynqPending("coupons")) || slot(AsynqTask("coupons", "b")) != slot(AsynqPending("coupons")) {
		t.Error("a queue's task and pending list on different slots")
	}
}
