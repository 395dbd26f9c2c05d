// Package keyspace builds every Redis key couponflow writes, in one place,
// as asynq keeps its own in internal/base: one prefix (default "cf") for
// all of them, and the hash-tag rules that decide which keys share a Redis
// Cluster slot. asynq's own keys ("asynq:…") are asynq's layout, not ours.
//
// Hash tags, decided once:
//
//   - A campaign's keys carry the campaign as their tag, {campaign}: its
//     records, counters, member list, meta, rate buckets and tombstone live
//     on one slot, so every script over a campaign touches one slot and
//     retention can find every key of a campaign from its name. Campaign
//     names are letters, digits, '_', '.' and '-' (tasks.ValidateCampaign),
//     so a name never holds a brace.
//   - A user lock is its own tag, {mchid:openid}: one send per user at a
//     time, spread over the cluster. On one Redis (standalone, Sentinel)
//     the claim and finish scripts take and release it with the record; on
//     a Cluster it is on another slot, so each costs a round trip of its own.
//   - A merchant's budget breakers and its set of open breakers share the
//     tag {mchid}, so the breaker script updates a breaker and the open set
//     in one atomic step.
//   - A rate limit is its own tag, {mchid:endpoint}: its GCRA state and
//     its adaptive rate live on one slot.
//   - The campaigns set, the orphan sweeper's hash and the fleet's locks
//     are single keys without a tag.
//
// The layout, with the default prefix:
//
//	cf:{spring}:send:<mchid>:<out_request_no>  hash    one send's record
//	cf:{spring}:counts                         hash    counts by state, failed:<code>, total
//	cf:{spring}:members                        list    <mchid>:<out_request_no>, in order
//	cf:{spring}:rate:<unix second>             string  successes in that second (10 min TTL)
//	cf:{spring}:failrate:<unix second>         string  permanent failures in that second (10 min TTL)
//	cf:{spring}:meta                           hash    mchid, deadline, created_at, retention, …
//	cf:{spring}:tomb                           hash    what survives a campaign's retention
//	cf:{spring}:coupons                        hash    coupon_id → <mchid>:<out_request_no>, for redemptions
//	cf:redeem:seen:{<notification id>}         string  a COUPON.USE notification already handled (48 h TTL)
//	cf:redeem:nonce:{<Wechatpay-Nonce>}        string  a notification's signature seen (6 min TTL): a replay
//	cf:redeem:stats                            hash    notifications for coupons not ours, refused ones
//	cf:campaigns                               set     every campaign's name
//	cf:user:{<mchid>:<openid>}                 string  the user lock
//	cf:breaker:{<mchid>}:stock:<stock_id>      hash    a stock's budget breaker
//	cf:breaker:{<mchid>}:open                  set     stocks whose breaker is open
//	cf:rl:{<mchid>:<endpoint>}                 string  GCRA state (go-redis/redis_rate)
//	cf:rl:{<mchid>:<endpoint>}:aimd            hash    the shared rate, the workers' limit, the learned ceiling (30 d TTL)
//	cf:lock:<name>                             string  a fleet-wide lock (one sweeper at a time)
//	cf:sweep:swept                             hash    campaign → when the orphan sweeper last swept it
//	cf:replica-ack                             string  the enqueuer's marker write before WAIT (standalone, Sentinel)
//	cf:replica-ack:{<n>}                       string  the same on each cluster master, n chosen to land there
//
// asynq's keys that the producer writes itself, exactly as asynq's client
// does (asynq/internal/base; asynq's own layout, outside the prefix):
//
//	asynq:queues                               set     every queue's name
//	asynq:{<queue>}:t:<task id>                hash    a task: msg, state, pending_since
//	asynq:{<queue>}:pending                    list    task ids, pushed at the head
package keyspace

import (
	"fmt"
	"strconv"
	"strings"
)

// DefaultPrefix is the prefix of every key unless configured otherwise.
const DefaultPrefix = "cf"

// Keys builds the keys under one prefix. The zero value uses DefaultPrefix.
type Keys struct{ prefix string }

// New returns the layout under prefix ("" means DefaultPrefix). A trailing
// colon is dropped: "cf" and "cf:" are the same layout.
func New(prefix string) Keys {
	return Keys{prefix: strings.TrimSuffix(prefix, ":")}
}

// Default is the layout under DefaultPrefix.
var Default = New(DefaultPrefix)

// Prefix is the prefix, without its colon.
func (k Keys) Prefix() string {
	if k.prefix == "" {
		return DefaultPrefix
	}
	return k.prefix
}

func (k Keys) campaign(campaign string) string { return k.Prefix() + ":{" + campaign + "}:" }

// Record is the hash of one send.
func (k Keys) Record(campaign, mchID, outRequestNo string) string {
	return k.campaign(campaign) + "send:" + mchID + ":" + outRequestNo
}

// Counts is a campaign's counters.
func (k Keys) Counts(campaign string) string { return k.campaign(campaign) + "counts" }

// Members lists a campaign's sends as "<mchid>:<out_request_no>".
func (k Keys) Members(campaign string) string { return k.campaign(campaign) + "members" }

// Rate counts a campaign's successes in one second.
func (k Keys) Rate(campaign string, unixSecond int64) string {
	return k.campaign(campaign) + "rate:" + strconv.FormatInt(unixSecond, 10)
}

// FailRate counts a campaign's permanent failures in one second, beside
// Rate's successes, so that a campaign failing every send does not read
// 0.0/s.
func (k Keys) FailRate(campaign string, unixSecond int64) string {
	return k.campaign(campaign) + "failrate:" + strconv.FormatInt(unixSecond, 10)
}

// Meta describes a campaign as its producer declared it.
func (k Keys) Meta(campaign string) string { return k.campaign(campaign) + "meta" }

// Audit is a campaign's audit trail: the operators' actions on it
// (pause, resume, cancel, retry), oldest first.
func (k Keys) Audit(campaign string) string { return k.campaign(campaign) + "audit" }

// NotifyLock is held while one worker posts a campaign's done webhook.
func (k Keys) NotifyLock(campaign string) string { return k.campaign(campaign) + "notify_lock" }

// Tomb is what is left of a campaign once its retention has passed.
func (k Keys) Tomb(campaign string) string { return k.campaign(campaign) + "tomb" }

// Coupons maps a campaign's issued coupon ids to their sends
// ("<mchid>:<out_request_no>"), written with the success in one script,
// so that a redemption notification, which names only the coupon, finds
// its send's record.
func (k Keys) Coupons(campaign string) string { return k.campaign(campaign) + "coupons" }

// RedeemSeen marks a redemption notification (WeChat's notification id)
// as handled, for the ones that match no send of ours: those have no
// record to hold the id. Its own tag: notifications spread over the cluster.
func (k Keys) RedeemSeen(notificationID string) string {
	return k.Prefix() + ":redeem:seen:{" + notificationID + "}"
}

// RedeemNonce marks a notification's Wechatpay-Nonce as seen for as
// long as its timestamp is accepted (5 minutes): the same signed bytes
// again are a replay. WeChat signs each delivery afresh.
func (k Keys) RedeemNonce(nonce string) string {
	return k.Prefix() + ":redeem:nonce:{" + nonce + "}"
}

// RedeemStats counts what the receiver handled that belongs to no
// campaign: notifications for coupons not ours, and refused ones.
func (k Keys) RedeemStats() string { return k.Prefix() + ":redeem:stats" }

// CampaignPattern matches every key of a campaign (for SCAN).
func (k Keys) CampaignPattern(campaign string) string { return k.campaign(campaign) + "*" }

// Campaigns is the set of every campaign's name.
func (k Keys) Campaigns() string { return k.Prefix() + ":campaigns" }

// UserLock is held while a send to the user is in flight.
func (k Keys) UserLock(mchID, openID string) string {
	return k.Prefix() + ":user:{" + mchID + ":" + openID + "}"
}

// Breaker is a stock's budget breaker.
func (k Keys) Breaker(mchID, stockID string) string {
	return k.Prefix() + ":breaker:{" + mchID + "}:stock:" + stockID
}

// MerchantBreaker is a merchant's breaker: open while WeChat refuses its
// signature (SIGN_ERROR). It shares Breaker's tag, so one script reads both.
func (k Keys) MerchantBreaker(mchID string) string {
	return k.Prefix() + ":breaker:{" + mchID + "}:merchant"
}

// OpenBreakers is the set of a merchant's stocks whose breaker is open; it
// shares Breaker's tag, so both change in one script.
func (k Keys) OpenBreakers(mchID string) string { return k.Prefix() + ":breaker:{" + mchID + "}:open" }

// Limiter is the GCRA state of a (merchant, endpoint) rate limit.
func (k Keys) Limiter(mchID, endpoint string) string {
	return k.Prefix() + ":rl:{" + mchID + ":" + endpoint + "}"
}

// LimiterRate is the adaptive shared rate of a (merchant, endpoint).
func (k Keys) LimiterRate(mchID, endpoint string) string { return k.Limiter(mchID, endpoint) + ":aimd" }

// Lock is a fleet-wide lock, such as the retention sweeper's.
func (k Keys) Lock(name string) string { return k.Prefix() + ":lock:" + name }

// Swept records when the orphan sweeper (internal/sweep) last swept each
// campaign; retention removes a campaign's field when its keys expire.
func (k Keys) Swept() string { return k.Prefix() + ":sweep:swept" }

// ReplicaAck is the marker the enqueuer writes before WAIT, so that one
// connection's write follows every earlier write (redisconn.Acknowledger).
func (k Keys) ReplicaAck() string { return k.Prefix() + ":replica-ack" }

// ReplicaAckTagged is ReplicaAck under hash tag {n}: in a cluster, n is
// tried until the key lands on the master to be waited for.
func (k Keys) ReplicaAckTagged(n int) string {
	return k.ReplicaAck() + ":{" + strconv.Itoa(n) + "}"
}

// AsynqQueues is asynq's set of queue names (base.AllQueues).
func AsynqQueues() string { return "asynq:queues" }

// AsynqTask is the hash of one asynq task (base.TaskKey), whose field
// "state" says where asynq holds it (pending, active, scheduled, retry,
// archived, completed): the producer writes it, the monitor reads it to
// find sends whose task is gone in one pipeline (TestAsynqTaskKey and
// TestQueuedAsAsynqWould fail if an asynq upgrade moves it).
func AsynqTask(queue, taskID string) string { return "asynq:{" + queue + "}:t:" + taskID }

// AsynqPending is a queue's list of pending task ids (base.PendingKey).
func AsynqPending(queue string) string { return "asynq:{" + queue + "}:pending" }

// Owns reports whether key belongs to this layout.
func (k Keys) Owns(key string) bool { return strings.HasPrefix(key, k.Prefix()+":") }

// EnvPrefix names the environment variable every program reads for the
// prefix (flag --key-prefix).
const EnvPrefix = "REDIS_KEY_PREFIX"

// Validate checks a prefix: letters, digits, '_', '.' and '-', so that it
// never holds a hash tag's brace or a separator of its own.
func Validate(prefix string) error {
	p := strings.TrimSuffix(prefix, ":")
	if p == "" || len(p) > 32 || strings.IndexFunc(p, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '.' || r == '-')
	}) >= 0 {
		return fmt.Errorf("key prefix %q must be 1-32 letters, digits, '_', '.' or '-'", prefix)
	}
	return nil
}
