package monitor

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"sort"
	"sync"
	"time"

	"github.com/couponflow/dispatcher/internal/breaker"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/sweep"
	"github.com/couponflow/dispatcher/internal/tasks"
)

// How many records a page reads to find a campaign's stocks and reasons:
// the list refreshes every campaign every few seconds, so it reads one
// batch each; the campaign's own page reads more. A campaign larger than
// that says its reasons are from a sample.
const (
	listSample   = 1000
	detailSample = 20000
)

// Stock is one of a campaign's stocks, with its breaker if open.
type Stock struct {
	StockID string `json:"stock_id"`
	// Breaker is its open budget breaker (or the merchant's, which holds
	// every stock), nil while it is sent.
	Breaker *Breaker `json:"breaker,omitempty"`
	// NextProbeIn and DeadlineIn are relative ("40 s", "2 days 23 h");
	// Remedy says what to do, in words.
	NextProbeIn string `json:"next_probe_in,omitempty"`
	DeadlineIn  string `json:"deadline_in,omitempty"`
	Remedy      string `json:"remedy,omitempty"`
}

// Reason is a group of unfinished or failed sends with the same answer.
type Reason struct {
	State   string `json:"state"`
	Code    string `json:"code"`
	Message string `json:"message"`
	N       int64  `json:"sends"`
}

// scanned is what reading a campaign's records found.
type scanned struct {
	stocks  []string
	reasons []Reason
	read    int
	partial bool // the campaign has more records than were read
	// waiting are the sends read that wait for a delivery asynq must hold
	// (sweep.WaitsForTask): those an orphan check looks for in asynq.
	waiting []taskRef
}

// taskRef is a waiting send's task id and the queues that may hold it.
type taskRef struct {
	outRequestNo string
	id           string
	queues       []string
}

var errEnough = errors.New("read enough")

// reasonStates are the states whose code and message say why a send is
// not (or not successfully) done.
var reasonStates = map[idempotency.State]bool{idempotency.Failed: true, idempotency.Retrying: true,
	idempotency.WaitingBudget: true, idempotency.WaitingRate: true, idempotency.Unknown: true}

// maxReasons is how many reason groups a page shows: the most frequent.
const maxReasons = 8

// scanCache keeps each campaign's last scan with the counters' ChangedAt
// it was made at: records change only with the counters, so a campaign
// whose sends did not move (every done one) is not read again at each
// refresh of the page.
type scanCache struct {
	mu sync.Mutex
	m  map[string]cachedScan
}

type cachedScan struct {
	changed time.Time
	at      time.Time
	limit   int
	sc      scanned
}

// rescanAfter is the least time between two scans of a campaign that
// keeps changing: a running campaign's page, refreshing every 2 s, would
// otherwise read up to detailSample records at each refresh. Its reasons
// and stocks are at most this old; its counters and state are read anew
// every time.
const rescanAfter = 10 * time.Second

// scanCached is scan, reusing the last scan of the campaign, if it read
// at least as far, while its ChangedAt is the same or for rescanAfter.
func (s *Server) scanCached(ctx context.Context, name string, changed time.Time, limit int) (scanned, error) {
	s.scans.mu.Lock()
	c, ok := s.scans.m[name]
	s.scans.mu.Unlock()
	far := c.limit >= limit || !c.sc.partial
	same := !changed.IsZero() && c.changed.Equal(changed)
	if ok && far && (same || time.Since(c.at) < rescanAfter) {
		return c.sc, nil
	}
	sc, err := s.scan(ctx, name, limit)
	if err != nil {
		return sc, err
	}
	s.scans.mu.Lock()
	if s.scans.m == nil {
		s.scans.m = map[string]cachedScan{}
	}
	s.scans.m[name] = cachedScan{changed: changed, at: time.Now(), limit: limit, sc: sc}
	s.scans.mu.Unlock()
	return sc, nil
}

// scan reads up to limit records of a campaign for its stocks and the
// reasons of its failed, retrying and held sends.
func (s *Server) scan(ctx context.Context, name string, limit int) (scanned, error) {
	var sc scanned
	stocks := map[string]bool{}
	type key struct{ state, code, msg string }
	groups := map[key]int64{}
	now := time.Now()
	err := s.store.Each(ctx, name, func(rec idempotency.Record) error {
		if sc.read >= limit {
			sc.partial = true
			return errEnough
		}
		sc.read++
		if rec.StockID != "" && !stocks[rec.StockID] {
			stocks[rec.StockID] = true
			sc.stocks = append(sc.stocks, rec.StockID)
		}
		if reasonStates[rec.State] && rec.Code != "" {
			groups[key{string(rec.State), rec.Code, reasonMessage(rec.Message)}]++
		}
		if sweep.WaitsForTask(rec, now) {
			sc.waiting = append(sc.waiting, taskRef{outRequestNo: rec.OutRequestNo,
				id: tasks.Key{MchID: rec.MchID, OutRequestNo: rec.OutRequestNo}.TaskID(), queues: s.taskQueues(rec.Queue)})
		}
		return nil
	})
	if err != nil && !errors.Is(err, errEnough) {
		return scanned{}, err
	}
	sort.Strings(sc.stocks)
	for k, n := range groups {
		sc.reasons = append(sc.reasons, Reason{State: k.state, Code: k.code, Message: k.msg, N: n})
	}
	sort.Slice(sc.reasons, func(i, j int) bool {
		a, b := sc.reasons[i], sc.reasons[j]
		if a.N != b.N {
			return a.N > b.N
		}
		if a.State != b.State {
			return a.State < b.State
		}
		return a.Code+a.Message < b.Code+b.Message
	})
	if len(sc.reasons) > maxReasons {
		sc.reasons = sc.reasons[:maxReasons]
	}
	return sc, nil
}

// stampRE matches the times the worker writes into a held send's message
// ("held: the stock's breaker is open until 2026-11-30T16:25:52Z").
var stampRE = regexp.MustCompile(`\b\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})`)

// reasonMessage is a message as reasons group it: one reason held until
// different times is still one reason (the card shows the breaker's next
// probe beside it).
func reasonMessage(msg string) string {
	return stampRE.ReplaceAllString(msg, "…")
}

// judge fills in what the campaign's counters, its records and the
// fleet say about it: its stocks and their breakers, its state.
func (s *Server) judge(c *Campaign, st idempotency.Status, sc scanned, open []breaker.State, lk *look) {
	c.Workers = lk.workers
	c.Reasons, c.ReasonsFrom = sc.reasons, sc.read
	if c.Reasons == nil {
		c.Reasons = []Reason{}
	}
	if !st.ChangedAt.IsZero() {
		at := st.ChangedAt.UTC()
		c.ChangedAt = &at
		c.ChangedAgo = since(lk.now, &at)
	}
	byStock := map[string]breaker.State{}
	var merchant *breaker.State
	for _, b := range open {
		if b.StockID == breaker.Merchant {
			m := b
			merchant = &m
			continue
		}
		byStock[b.StockID] = b
	}
	// The breakers that hold this campaign: its stocks' and the merchant's.
	var holding []breaker.State
	c.Stocks = []Stock{}
	for _, id := range sc.stocks {
		stock := Stock{StockID: id}
		b, ok := byStock[id]
		if !ok && merchant != nil {
			b, ok = *merchant, true
		}
		if ok {
			holding = append(holding, b)
			stock.Breaker = breakerView(b, lk.now)
			stock.NextProbeIn = stock.Breaker.NextProbeIn
			if !c.Deadline.IsZero() && c.Deadline.After(lk.now) {
				stock.DeadlineIn = ago(c.Deadline.Sub(lk.now))
			}
			stock.Remedy = remedy(b, id, stock.DeadlineIn)
		}
		c.Stocks = append(c.Stocks, stock)
	}
	if merchant != nil && len(sc.stocks) == 0 {
		holding = append(holding, *merchant)
	}
	var touched int64
	for _, state := range []idempotency.State{idempotency.InFlight, idempotency.Retrying, idempotency.WaitingRate, idempotency.WaitingBudget} {
		touched += st.ByState[state]
	}
	c.campaignState = stateOf(stateInput{
		Now: lk.now, Control: c.Control, Done: c.Done, Total: c.Total, Finished: c.Finished,
		Succeeded: c.Succeeded, Failed: c.Failed, Cancelled: c.Cancelled, Unknown: c.Unknown, Scheduled: c.Scheduled,
		Touched: touched, WaitingBudget: st.ByState[idempotency.WaitingBudget], WaitingRate: st.ByState[idempotency.WaitingRate],
		Orphans: c.Orphans, InFlight: st.ByState[idempotency.InFlight], Settled10s: st.Rate10s + st.FailRate10s, Workers: lk.workers, ChangedAt: st.ChangedAt, Breakers: holding,
	})
	for _, state := range []idempotency.State{idempotency.Failed, idempotency.Unknown, idempotency.Retrying,
		idempotency.WaitingBudget, idempotency.WaitingRate, idempotency.InFlight, idempotency.Cancelled} {
		if st.ByState[state] > 0 {
			c.CSVStates = append(c.CSVStates, string(state))
		}
	}
	c.ReasonsPartial = sc.partial && c.Failed+c.Unknown+touched-st.ByState[idempotency.InFlight] > 0
	timing(c, lk.now)
}

// timing fills in the rates, elapsed time, duration and ETA.
func timing(c *Campaign, now time.Time) {
	start := c.CreatedAt
	if c.StartAt != nil && c.StartAt.After(start) {
		start = *c.StartAt
	}
	if c.Done {
		// Nothing is sent any more: a rate still counting the last minute
		// would say otherwise.
		c.Rate, c.Rate10s, c.FailRate, c.FailRate10s = 0, 0, 0, 0
		// Finished when the fleet said so (DoneAt), or, before a worker's
		// notifier has noticed, when its last send settled.
		end := c.DoneAt
		if end == nil {
			end = c.ChangedAt
		}
		if end != nil && !start.IsZero() && !end.Before(start) {
			c.Duration = ago(end.Sub(start))
		}
		return
	}
	if !start.IsZero() && now.After(start) {
		c.Elapsed = ago(now.Sub(start))
	}
	pace := c.Rate10s + c.FailRate10s
	if pace == 0 {
		pace = c.Rate + c.FailRate
	}
	var at time.Time
	c.ETA, at = etaOf(c.State, c.Total-c.Finished-c.Unknown, pace, now)
	if !at.IsZero() {
		at = at.UTC()
		c.ETAAt = &at
	}
}

// etaOf says when a campaign in state, with remaining sends to settle at
// pace per second, finishes: a time while it moves, else why not.
func etaOf(state string, remaining int64, pace float64, now time.Time) (string, time.Time) {
	switch state {
	case StateBlocked, StateStalled, StatePaused, StateCancelled, StateScheduled, StateQueued:
		return state, time.Time{}
	}
	if remaining <= 0 {
		return "any moment", time.Time{}
	}
	if pace <= 0 {
		return "unknown: no send settled in the last minute", time.Time{}
	}
	d := time.Duration(float64(remaining) / pace * float64(time.Second))
	return "in " + ago(d), now.Add(d)
}

func breakerView(b breaker.State, now time.Time) *Breaker {
	v := &Breaker{StockID: b.StockID, Reason: b.Reason, OpenedAt: b.OpenedAt.UTC(),
		NextProbe: b.NextProbe.UTC(), Interval: b.Interval.String(), Probes: b.Probes, NextProbeIn: "now"}
	if b.NextProbe.Sub(now) >= time.Second {
		v.NextProbeIn = ago(b.NextProbe.Sub(now))
	}
	return v
}

// remedy says what an operator does about an open breaker.
func remedy(b breaker.State, stockID, deadlineIn string) string {
	if b.StockID == breaker.Merchant {
		return "WeChat refuses the merchant's signature (" + b.Reason + "): fix the merchant's key or certificate; " +
			"the breaker probes by itself and closes on the first success"
	}
	r := fmt.Sprintf("top up stock %s (or restart it if it was stopped), then run enqueuer stock resume --stock-id %s; "+
		"the breaker also probes by itself", stockID, stockID)
	if deadlineIn != "" {
		r += "; held sends fail NOT_ENOUGH at the campaign's budget deadline, in " + deadlineIn
	}
	return r
}

// since is a past time relative to now, "" if zero.
func since(now time.Time, t *time.Time) string {
	if t == nil || t.IsZero() {
		return ""
	}
	return ago(now.Sub(*t))
}
