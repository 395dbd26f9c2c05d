package idempotency

import (
	"context"
	_ "embed"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// Control is what an operator has made of a campaign: running (""),
// paused or cancelled. It lives in the campaign's meta, where every claim
// reads it, so a pause or a cancel holds across the whole fleet from the
// moment it is written.
type Control string

const (
	Running         Control = ""
	Paused          Control = "paused"
	CancelledByUser Control = "cancelled"
)

// Action is one entry of a campaign's audit trail.
type Action struct {
	At     time.Time `json:"at"`
	Who    string    `json:"who"`
	Action string    `json:"action"` // pause, resume, cancel, reopen, retry
	Sends  int64     `json:"sends"`  // how many sends it touched
	Note   string    `json:"note,omitempty"`
}

// auditKeep bounds a campaign's audit trail.
const auditKeep = 1000

var (
	//go:embed cancel.lua
	cancelLua    string
	cancelScript = redis.NewScript(libLua + cancelLua)
	//go:embed retry.lua
	retryLua    string
	retryScript = redis.NewScript(libLua + retryLua)
)

// SetControl pauses, resumes or cancels a campaign and keeps the action in
// its audit trail, in one transaction. It does not touch the sends: a
// claim reads the control (see TryClaim), CancelSends settles the ones
// that wait.
func (s *Store) SetControl(ctx context.Context, campaign string, c Control, a Action) error {
	if a.At.IsZero() {
		a.At = s.now()
	}
	b, err := json.Marshal(a)
	if err != nil {
		return err
	}
	_, err = s.rdb.TxPipelined(ctx, func(p redis.Pipeliner) error {
		p.HSet(ctx, s.metaKey(campaign), "control", string(c))
		p.RPush(ctx, s.keys.Audit(campaign), b)
		p.LTrim(ctx, s.keys.Audit(campaign), -auditKeep, -1)
		return nil
	})
	if err != nil {
		return fmt.Errorf("idempotency: %s campaign %s: %w", a.Action, campaign, err)
	}
	return nil
}

// Note adds an action to a campaign's audit trail without changing its
// control (a retry).
func (s *Store) Note(ctx context.Context, campaign string, a Action) error {
	if a.At.IsZero() {
		a.At = s.now()
	}
	b, err := json.Marshal(a)
	if err != nil {
		return err
	}
	_, err = s.rdb.TxPipelined(ctx, func(p redis.Pipeliner) error {
		p.RPush(ctx, s.keys.Audit(campaign), b)
		p.LTrim(ctx, s.keys.Audit(campaign), -auditKeep, -1)
		return nil
	})
	if err != nil {
		return fmt.Errorf("idempotency: noting %s on %s: %w", a.Action, campaign, err)
	}
	return nil
}

// ControlOf reads a campaign's control.
func (s *Store) ControlOf(ctx context.Context, campaign string) (Control, error) {
	v, err := s.rdb.HGet(ctx, s.metaKey(campaign), "control").Result()
	if err == redis.Nil {
		return Running, nil
	}
	if err != nil {
		return Running, fmt.Errorf("idempotency: reading the control of %s: %w", campaign, err)
	}
	return Control(v), nil
}

// Audit returns a campaign's audit trail, oldest first.
func (s *Store) Audit(ctx context.Context, campaign string) ([]Action, error) {
	raw, err := s.rdb.LRange(ctx, s.keys.Audit(campaign), 0, -1).Result()
	if err != nil {
		return nil, fmt.Errorf("idempotency: reading the audit trail of %s: %w", campaign, err)
	}
	out := make([]Action, 0, len(raw))
	for _, r := range raw {
		var a Action
		if json.Unmarshal([]byte(r), &a) == nil {
			out = append(out, a)
		}
	}
	return out, nil
}

// CancelCount is what CancelSends did.
type CancelCount struct {
	Cancelled int64 // never called: cancelled
	Unknown   []Record
	InFlight  int64 // being called: recorded for what they are
	Stopped   int64 // already succeeded, failed, cancelled or unknown
}

// CancelSends settles every send of a cancelled campaign that waits:
// cancelled, or unknown where a call may have issued it (listed, for
// reconcile). Run it after SetControl(CancelledByUser): a send it misses
// (in flight, or registered meanwhile) is stopped by its next claim.
func (s *Store) CancelSends(ctx context.Context, campaign string) (CancelCount, error) {
	var n CancelCount
	err := s.Each(ctx, campaign, func(r Record) error {
		switch r.State {
		case Succeeded, Failed, Cancelled, Unknown:
			n.Stopped++
			return nil
		case InFlight:
			n.InFlight++
			return nil
		}
		res, err := cancelScript.Run(ctx, s.rdb, []string{s.recordKey(campaign, r.MchID, r.OutRequestNo), s.countsKey(campaign)},
			s.now().UnixMilli()).Text()
		if err != nil {
			return fmt.Errorf("idempotency: cancelling %s: %w", r.OutRequestNo, err)
		}
		switch res {
		case "cancelled":
			n.Cancelled++
		case "unknown":
			r.State = Unknown
			n.Unknown = append(n.Unknown, r)
		case "in_flight":
			n.InFlight++
		default:
			n.Stopped++
		}
		return nil
	})
	return n, err
}

// Requeue moves a stopped send (failed, unknown or cancelled) back to
// pending so that its kept task can be queued again under the same
// out_request_no. It reports false if the send is no longer in state
// from; an error names a send that kept no task.
func (s *Store) Requeue(ctx context.Context, r Record, from State) (bool, error) {
	res, err := retryScript.Run(ctx, s.rdb, []string{s.recordKey(r.Campaign, r.MchID, r.OutRequestNo), s.countsKey(r.Campaign)},
		string(from), s.now().UnixMilli()).Text()
	if err != nil {
		return false, fmt.Errorf("idempotency: requeueing %s: %w", r.OutRequestNo, err)
	}
	switch res {
	case "ok":
		return true, nil
	case "no_task":
		return false, fmt.Errorf("idempotency: %s kept no task (recorded before tasks were kept with failed sends): send it again with enqueuer send, under the same --out-request-no", r.OutRequestNo)
	}
	return false, nil
}

// FinalCode says whether a failure code comes back the same on a resend
// of the same request, so that retrying it cannot help, and why. The
// request's own mistakes are final; a state of WeChat's (a budget, a
// user's limit, an account, a stock) may change.
func FinalCode(code, message string) (bool, string) {
	switch code {
	case "PARAM_ERROR", "INVALID_ARGUMENT":
		return true, "the request itself is malformed; the same request gets the same answer"
	case "APPID_MCHID_NOT_MATCH", "MCH_NOT_EXISTS":
		return true, "the merchant and appid of the request do not match; fix the configuration and send a new campaign"
	case "INVALID_REQUEST":
		if strings.Contains(message, "已使用") || strings.Contains(message, "different parameters") {
			return true, "this out_request_no was used with other parameters; WeChat will refuse it for ever"
		}
		if strings.Contains(message, "openid与appid不匹配") {
			return true, "the openid belongs to another appid; the same request gets the same answer"
		}
	}
	return false, ""
}

// SetNotifyURL makes the campaign's end post its summary to url (package
// notify); "" leaves it as it is.
func (s *Store) SetNotifyURL(ctx context.Context, campaign, url string) error {
	if url == "" {
		return nil
	}
	if err := s.rdb.HSet(ctx, s.metaKey(campaign), "notify_url", url).Err(); err != nil {
		return fmt.Errorf("idempotency: setting the notify url of %s: %w", campaign, err)
	}
	return nil
}

// ClearDone forgets that a campaign was said to be done, when sends are
// queued into it again (a retry, a reopen): its next end is said again.
func (s *Store) ClearDone(ctx context.Context, campaign string) error {
	err := s.rdb.HDel(ctx, s.metaKey(campaign), "done_at", "notify_status", "notify_next", "notify_attempts",
		"notify_body", "notify_error", "notify_delivered_at").Err()
	if err != nil {
		return fmt.Errorf("idempotency: reopening %s: %w", campaign, err)
	}
	return nil
}
