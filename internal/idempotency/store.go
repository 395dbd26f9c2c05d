// Package idempotency is the durable record of every send, in Redis. asynq
// forgets a task id once the task succeeds and keeps only a bounded archive,
// so it cannot say what was sent; this package can. One hash per
// (merchant, out_request_no) holds the state, the coupon id or the last
// error, the attempts and their times; per-campaign counters move with it
// in the same atomic step, so status is a single read.
//
// Before each WeChat call a worker claims the send with a lease: two
// deliveries of one task (asynq is at-least-once) never call WeChat at the
// same time, and a send already recorded as succeeded or failed is never
// sent again.
package idempotency

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/keyspace"
	"github.com/couponflow/dispatcher/internal/tasks"
)

// State of one send.
type State string

const (
	Pending       State = "pending"        // enqueued, never tried
	InFlight      State = "in_flight"      // claimed; a call may be under way
	Retrying      State = "retrying"       // the last call was ambiguous; it will be resent as is
	WaitingRate   State = "waiting_rate"   // WeChat said too many calls; waiting
	WaitingBudget State = "waiting_budget" // the stock's budget was exhausted; waiting for a top-up
	Succeeded     State = "succeeded"      // the coupon exists: CouponID
	Failed        State = "failed"         // WeChat refused it, so no coupon exists: Code, Message
	// Unknown: the retries ran out without an answer from WeChat, and the
	// coupon may exist. Only WeChat can say: `enqueuer reconcile` resends
	// the identical request and records the answer.
	Unknown State = "unknown"
	// Cancelled: an operator cancelled the campaign before the send was
	// called; nothing was issued. enqueuer retry --state cancelled queues
	// it again.
	Cancelled State = "cancelled"
)

// States lists every state, in the order status shows them.
var States = []State{Pending, InFlight, Retrying, WaitingRate, WaitingBudget, Succeeded, Failed, Unknown, Cancelled}

// Terminal reports whether the outcome is known for good: no further call
// will be made.
func (s State) Terminal() bool { return s == Succeeded || s == Failed || s == Cancelled }

// Stopped reports whether no worker will take the send up again by
// itself: its outcome is known, or it is unknown and waits for reconcile.
func (s State) Stopped() bool { return s.Terminal() || s == Unknown }

// Record is what the store knows of one send.
type Record struct {
	MchID        string
	OutRequestNo string
	Campaign     string
	OpenID       string
	StockID      string
	State        State
	CouponID     string
	Code         string // last error code, "" after a success
	Message      string
	Attempts     int
	FirstAttempt time.Time // zero if never tried
	LastAttempt  time.Time
	// MaybeIssued: a call may have issued a coupon that no answer showed
	// (an ambiguous outcome, or a delivery that died holding the send).
	// Until WeChat answers this out_request_no, the send is never
	// recorded as failed and never held by a budget breaker.
	MaybeIssued bool
	// Task is the send's task as tasks.Keep wrote it (the record may hold
	// it slim: tasks.KeepSlim), kept until the send is settled: the sweeper queues it again if asynq loses it, and
	// reconcile resends it.
	Task []byte
	// Queue is the asynq queue the producer put the task in.
	Queue string
	// LeaseUntil is when an in-flight claim runs out.
	LeaseUntil time.Time
	// ClaimedFrom is the state the send was in when last claimed.
	ClaimedFrom State
	// DoneAt is when the last call's result was recorded: for a
	// succeeded send, when its coupon was recorded.
	DoneAt time.Time

	// The coupon's redemption (Redeem), zero until it is used: when
	// (consume_time), by which merchant, on which payment, for how much
	// (fen); when it was recorded, and from what (RedeemedByNotify,
	// RedeemedBySync) and which notification.
	UsedAt            time.Time
	UsedMchID         string
	UsedTransactionID string
	UsedAmount        int64
	RedeemedAt        time.Time
	RedeemSource      string
	NotificationID    string
}

// Send names one send and says where it belongs.
type Send struct {
	MchID        string
	OutRequestNo string
	Campaign     string
	OpenID       string
	StockID      string
	// Task (tasks.Keep or tasks.KeepSlim) and Queue, for Register: kept in the record until
	// the coupon exists, so that a task asynq lost can be queued again.
	Task  []byte
	Queue string
	// Settle marks a final delivery (reconcile) for TryClaim: a paused or
	// cancelled campaign does not stop it, since it is how an unknown
	// send learns whether its coupon exists.
	Settle bool
}

// Store is the Redis-backed record. Keys of one campaign share a hash tag,
// so a campaign's records and counters live on one Redis Cluster slot and
// every script touches a single slot (see internal/keyspace); only on one
// Redis do the claim and finish scripts also take and release the user
// lock, which is on a slot of its own.
type Store struct {
	rdb  redis.UniversalClient
	keys keyspace.Keys
	now  func() time.Time
	// lockApart: the user lock is on another Cluster slot than the
	// campaign's keys, so it cannot be taken and released in the claim and
	// finish scripts and costs a round trip of its own each time.
	lockApart bool
}

// Option configures a Store.
type Option func(*Store)

// WithKeys sets the key layout (default keyspace.Default).
func WithKeys(k keyspace.Keys) Option { return func(s *Store) { s.keys = k } }

// WithPrefix sets the key prefix (default "cf"): WithKeys(keyspace.New(p)).
func WithPrefix(p string) Option { return WithKeys(keyspace.New(p)) }

// New returns a store over rdb.
func New(rdb redis.UniversalClient, opts ...Option) *Store {
	_, cluster := rdb.(*redis.ClusterClient)
	s := &Store{rdb: rdb, keys: keyspace.Default, now: time.Now, lockApart: cluster}
	for _, o := range opts {
		o(s)
	}
	return s
}

func (s *Store) recordKey(campaign, mchID, outRequestNo string) string {
	return s.keys.Record(campaign, mchID, outRequestNo)
}
func (s *Store) countsKey(campaign string) string          { return s.keys.Counts(campaign) }
func (s *Store) membersKey(campaign string) string         { return s.keys.Members(campaign) }
func (s *Store) rateKey(campaign string, sec int64) string { return s.keys.Rate(campaign, sec) }
func (s *Store) campaignsKey() string                      { return s.keys.Campaigns() }
func (s *Store) userLockKey(mchID, openID string) string   { return s.keys.UserLock(mchID, openID) }

// Keys is the store's key layout.
func (s *Store) Keys() keyspace.Keys { return s.keys }

// Redis is the client the store writes through.
func (s *Store) Redis() redis.UniversalClient { return s.rdb }

var (
	//go:embed lib.lua
	libLua string
	//go:embed register.lua
	registerLua    string
	registerScript = redis.NewScript(libLua + registerLua)
	//go:embed claim.lua
	claimLua    string
	claimScript = redis.NewScript(libLua + claimLua)
	//go:embed finish.lua
	finishLua    string
	finishScript = redis.NewScript(libLua + finishLua)
	//go:embed unlock.lua
	unlockLua    string
	unlockScript = redis.NewScript(unlockLua)
)

// Register creates the record of a send as pending, adds it to its
// campaign and counts it, unless it exists. It returns whether it was
// created and, if not, the state it is in: a producer must not enqueue a
// send whose record is terminal, since asynq no longer remembers its task id.
// A new send in a sealed campaign whose keys are still kept reopens it; in
// one whose retention has passed it is refused with an *ExpiredError.
func (s *Store) Register(ctx context.Context, send Send) (created bool, state State, err error) {
	regs, err := s.RegisterBatch(ctx, []Send{send})
	if err != nil {
		return false, "", err
	}
	return regs[0].Created, regs[0].State, nil
}

// Registered is what RegisterBatch did with one send.
type Registered struct {
	Created bool  // the record is new, pending
	State   State // the state it was already in, if not created
}

// registerChunk bounds the sends of one script call: one call blocks
// Redis for its whole run, and Lua's unpack has a bounded stack.
const registerChunk = 512

// RegisterBatch is Register for many sends, all of one campaign, in one
// round trip and one atomic step: registering sends one by one costs a
// round trip and a script call each, more than the writes themselves. A
// send named twice in sends is created once; the second reads as pending.
func (s *Store) RegisterBatch(ctx context.Context, sends []Send) ([]Registered, error) {
	out := make([]Registered, 0, len(sends))
	for len(sends) > 0 {
		n := min(len(sends), registerChunk)
		regs, err := s.registerBatch(ctx, sends[:n])
		if err != nil {
			return nil, err
		}
		out = append(out, regs...)
		sends = sends[n:]
	}
	return out, nil
}

func (s *Store) registerBatch(ctx context.Context, sends []Send) ([]Registered, error) {
	c := sends[0].Campaign
	keys := make([]string, 4, 4+len(sends))
	keys[0], keys[1], keys[2], keys[3] = s.countsKey(c), s.membersKey(c), s.metaKey(c), s.keys.Tomb(c)
	argv := make([]any, 2, 2+6*len(sends))
	argv[0], argv[1] = c, s.now().UnixMilli()
	for _, send := range sends {
		if send.Campaign != c {
			return nil, fmt.Errorf("idempotency: one batch holds sends of campaigns %q and %q", c, send.Campaign)
		}
		keys = append(keys, s.recordKey(c, send.MchID, send.OutRequestNo))
		argv = append(argv, send.MchID, send.OutRequestNo, send.OpenID, send.StockID, send.Task, send.Queue)
	}
	res, err := registerScript.Run(ctx, s.rdb, keys, argv...).Result()
	if err != nil {
		return nil, fmt.Errorf("idempotency: registering %s: %w", describe(sends), err)
	}
	if res == "closed" {
		return nil, s.closedError(ctx, c)
	}
	states, ok := res.([]any)
	if !ok || len(states) != len(sends) {
		return nil, fmt.Errorf("idempotency: registering %s: the script answered %v", describe(sends), res)
	}
	out := make([]Registered, len(sends))
	for i, v := range states {
		st, _ := v.(string)
		if st == "new" {
			out[i] = Registered{Created: true, State: Pending}
		} else {
			out[i] = Registered{State: State(st)}
		}
	}
	return out, nil
}

// describe names a batch's sends for an error message.
func describe(sends []Send) string {
	if len(sends) == 1 {
		return sends[0].OutRequestNo
	}
	return fmt.Sprintf("%d sends (%s … %s)", len(sends), sends[0].OutRequestNo, sends[len(sends)-1].OutRequestNo)
}

// Claim is the outcome of TryClaim.
type Claim struct {
	// Acquired: this caller may call WeChat now, and must Finish.
	Acquired bool
	// Record is the send as it stood: for a terminal send, its result.
	Record Record
	// Busy: another delivery holds the send, or another send to the same
	// user is in flight; try again shortly.
	Busy bool
	// Paused: an operator paused the campaign; the send was not claimed.
	Paused bool
	// Cancelled: an operator cancelled the campaign; the send was not
	// claimed, and Record is how it ends (Cancelled, or Unknown if a call
	// of it may have issued a coupon).
	Cancelled bool
}

// ErrLeaseLost is returned by Finish when another delivery claimed the send
// after this one's lease ran out; the result was not recorded.
var ErrLeaseLost = errors.New("idempotency: lease lost to another delivery")

// TryClaim takes the send for owner for lease, together with a lock on its
// user (WeChat answers parallel sends to one openid with spurious
// rule-limit errors). A terminal send is returned as it is, unclaimed. A
// send without a record in a campaign whose retention has passed is
// refused with an *ExpiredError.
//
// On one Redis (standalone or Sentinel) the lock is taken by the claim
// script and released by Finish's, so a send costs two round trips to the
// store; on a Cluster, where the lock has a slot of its own, four.
func (s *Store) TryClaim(ctx context.Context, send Send, owner string, lease time.Duration) (Claim, error) {
	lockKey := s.userLockKey(send.MchID, send.OpenID)
	lockVal := owner + "|" + send.OutRequestNo
	keys := []string{s.recordKey(send.Campaign, send.MchID, send.OutRequestNo), s.countsKey(send.Campaign),
		s.membersKey(send.Campaign), s.metaKey(send.Campaign), s.keys.Tomb(send.Campaign)}
	if s.lockApart {
		if c, done, err := s.lockUser(ctx, send, lockKey, lockVal, lease); done {
			return c, err
		}
	} else {
		keys = append(keys, lockKey) // claim.lua takes the lock too
	}
	now := s.now()
	res, err := claimScript.Run(ctx, s.rdb, keys,
		owner, now.UnixMilli(), lease.Milliseconds(), send.Campaign, send.MchID, send.OutRequestNo,
		send.OpenID, send.StockID, send.Settle, lockVal).Slice()
	if err != nil {
		s.unlock(ctx, lockKey, lockVal)
		return Claim{}, fmt.Errorf("idempotency: claiming %s: %w", send.OutRequestNo, err)
	}
	verdict, _ := res[0].(string)
	if verdict != "claimed" && s.lockApart {
		s.unlock(ctx, lockKey, lockVal)
	}
	if verdict == "closed" {
		return Claim{}, s.closedError(ctx, send.Campaign)
	}
	fields := map[string]string{}
	if kv, ok := res[1].([]any); ok {
		for i := 0; i+1 < len(kv); i += 2 {
			k, _ := kv[i].(string)
			v, _ := kv[i+1].(string)
			fields[k] = v
		}
	}
	rec := recordFrom(send.MchID, send.OutRequestNo, fields)
	switch verdict {
	case "claimed":
		return Claim{Acquired: true, Record: rec}, nil
	case "busy":
		return Claim{Busy: true, Record: rec}, nil
	case "paused":
		return Claim{Paused: true, Record: rec}, nil
	case "cancelled":
		return Claim{Cancelled: true, Record: rec}, nil
	default: // terminal
		return Claim{Record: rec}, nil
	}
}

// lockUser takes the user lock on its own, on a Redis Cluster, before the
// claim script. done: the send was not claimed, and c and err say why.
func (s *Store) lockUser(ctx context.Context, send Send, lockKey, lockVal string, lease time.Duration) (c Claim, done bool, err error) {
	ok, err := s.rdb.SetNX(ctx, lockKey, lockVal, lease).Result()
	if err != nil {
		return Claim{}, true, fmt.Errorf("idempotency: locking user of %s: %w", send.OutRequestNo, err)
	}
	if ok {
		return Claim{}, false, nil
	}
	// Our own earlier attempt may hold it (a redelivery of the same send by
	// the same owner); otherwise someone else is sending.
	cur, err := s.rdb.Get(ctx, lockKey).Result()
	if err != nil && !errors.Is(err, redis.Nil) {
		return Claim{}, true, fmt.Errorf("idempotency: reading user lock: %w", err)
	}
	if cur == lockVal {
		s.rdb.PExpire(ctx, lockKey, lease)
		return Claim{}, false, nil
	}
	// A lock without a TTL (written by hand, or by an old version) would
	// hold the user for ever: bound it.
	if ttl, err := s.rdb.PTTL(ctx, lockKey).Result(); err == nil && ttl == -1 {
		s.rdb.PExpire(ctx, lockKey, lease)
	}
	rec, err := s.Get(ctx, send)
	if err != nil {
		return Claim{}, true, err
	}
	if rec.State.Terminal() {
		return Claim{Record: rec}, true, nil
	}
	return Claim{Busy: true, Record: rec}, true, nil
}

// Result is what a call came to.
type Result struct {
	State    State // Succeeded, Failed, Retrying, WaitingRate or WaitingBudget
	CouponID string
	Code     string
	Message  string
	// NotCalled: the send was stopped before calling WeChat (a rate slot
	// too far away, a budget breaker), so the claim was no attempt.
	NotCalled bool
	// MaybeIssued: the call may have issued a coupon its answer did not
	// show; the record keeps that until Answered.
	MaybeIssued bool
	// Answered: WeChat answered this out_request_no itself (a coupon, or a
	// refusal that proves none exists), which clears MaybeIssued.
	Answered bool
	// Task is the kept task, stored with an Unknown send whose producer
	// did not register it.
	Task []byte
}

func (r Result) issued() string {
	switch {
	case r.MaybeIssued:
		return "set"
	case r.Answered:
		return "clear"
	}
	return ""
}

// Finish records the result of the call owner made and releases the send
// and its user, in one atomic step with the campaign counters. A success is
// recorded even if the lease was lost meanwhile: a coupon that WeChat
// issued must never be missing from the record.
func (s *Store) Finish(ctx context.Context, send Send, owner string, r Result) error {
	now := s.now()
	lockKey, lockVal := s.userLockKey(send.MchID, send.OpenID), owner+"|"+send.OutRequestNo
	keys := []string{s.recordKey(send.Campaign, send.MchID, send.OutRequestNo), s.countsKey(send.Campaign),
		s.rateKey(send.Campaign, now.Unix()), s.keys.Coupons(send.Campaign), s.keys.FailRate(send.Campaign, now.Unix())}
	if !s.lockApart {
		keys = append(keys, lockKey) // finish.lua releases the lock too
	}
	res, err := finishScript.Run(ctx, s.rdb, keys,
		owner, string(r.State), r.CouponID, r.Code, r.Message, now.UnixMilli(), r.NotCalled, r.issued(), r.Task,
		send.MchID+":"+send.OutRequestNo, lockVal).Text()
	if err != nil {
		return fmt.Errorf("idempotency: recording %s: %w", send.OutRequestNo, err)
	}
	if s.lockApart {
		s.unlock(ctx, lockKey, lockVal)
	}
	if res == "lost" {
		return ErrLeaseLost
	}
	return nil
}

func (s *Store) unlock(ctx context.Context, key, val string) {
	// Best effort: a lock left behind expires with its lease.
	_ = unlockScript.Run(ctx, s.rdb, []string{key}, val).Err()
}

// Get reads the record of a send; a send never registered reads as a
// zero Record with State "".
func (s *Store) Get(ctx context.Context, send Send) (Record, error) {
	m, err := s.rdb.HGetAll(ctx, s.recordKey(send.Campaign, send.MchID, send.OutRequestNo)).Result()
	if err != nil {
		return Record{}, fmt.Errorf("idempotency: reading %s: %w", send.OutRequestNo, err)
	}
	return recordFrom(send.MchID, send.OutRequestNo, m), nil
}

func recordFrom(mchID, outRequestNo string, m map[string]string) Record {
	r := Record{
		MchID: mchID, OutRequestNo: outRequestNo, Campaign: m["campaign"], OpenID: m["openid"],
		StockID: m["stock_id"], State: State(m["state"]), CouponID: m["coupon_id"], Code: m["code"],
		Message: m["message"], MaybeIssued: m["maybe_issued"] == "1", ClaimedFrom: State(m["claimed_from"]),
	}
	if p, ok := m["task"]; ok {
		// A producer keeps a pending send's task slim (tasks.KeepSlim);
		// a kept task that cannot be read is returned as it is, for its
		// reader's error to show.
		r.Task = []byte(p)
		if kept, err := tasks.Unslim(r.Task, r.Campaign, mchID, r.OpenID, r.StockID, outRequestNo); err == nil {
			r.Task = kept
		}
	}
	r.Queue = m["queue"]
	r.LeaseUntil = millis(m["lease_until"])
	r.Attempts, _ = strconv.Atoi(m["attempts"])
	r.FirstAttempt = millis(m["first_at"])
	r.LastAttempt = millis(m["last_at"])
	r.DoneAt = millis(m["done_at"])
	r.UsedAt = millis(m["used_at"])
	r.UsedMchID, r.UsedTransactionID = m["used_mchid"], m["used_txn"]
	r.UsedAmount, _ = strconv.ParseInt(m["used_amount"], 10, 64)
	r.RedeemedAt = millis(m["redeemed_at"])
	r.RedeemSource, r.NotificationID = m["redeem_src"], m["notify_id"]
	return r
}

func millis(s string) time.Time {
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n == 0 {
		return time.Time{}
	}
	return time.UnixMilli(n)
}
