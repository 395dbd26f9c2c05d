package monitor

import (
	"context"
	"fmt"
	"math"
	"net/url"
	"sort"
	"time"

	"github.com/couponflow/dispatcher/internal/breaker"
	"github.com/couponflow/dispatcher/internal/campaignctl"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/ratelimit"
	"github.com/couponflow/dispatcher/internal/tasks"
)

// Campaign is a campaign's progress as the API and the pages show it.
type Campaign struct {
	Name      string    `json:"campaign"`
	MchID     string    `json:"mchid"`
	CreatedAt time.Time `json:"created_at"`
	Deadline  time.Time `json:"deadline"`
	Total     int64     `json:"total"`
	// Finished counts sends in a terminal state: Succeeded, Failed and
	// Cancelled.
	Finished  int64 `json:"finished"`
	Succeeded int64 `json:"succeeded"`
	Failed    int64 `json:"failed"`
	// Cancelled counts sends an operator's cancel settled without a call.
	Cancelled int64 `json:"cancelled"`
	// Waiting counts the sends not yet done: those a pause holds and a
	// cancel settles.
	Waiting int64 `json:"waiting"`
	// Unknown counts sends whose retries ran out without WeChat's answer:
	// not failed, since the coupon may exist; enqueuer reconcile settles them.
	Unknown int64 `json:"unknown"`
	// Percent is Finished of Total, truncated to 0.1 (100 means done).
	Percent      float64          `json:"percent"`
	ByState      map[string]int64 `json:"by_state"`
	FailedByCode map[string]int64 `json:"failed_by_code"`
	// Rate is successes per second over the last minute, Rate10s over the
	// last ten seconds (idempotency.Status).
	Rate    float64 `json:"rate_per_second"`
	Rate10s float64 `json:"rate_10s"`
	// FailRate and FailRate10s count permanent failures the same way. All
	// four are 0 once the campaign is done: nothing is sent any more.
	FailRate    float64 `json:"failure_rate_per_second"`
	FailRate10s float64 `json:"failure_rate_10s"`
	// ETA is when it should finish at the recent pace ("in 3 min"), or why
	// no time can be given ("blocked", "stalled", …); "" once done.
	// ETAAt is that time. Elapsed is the time since it started (its
	// creation, or its scheduled start), Duration the time it took once
	// done (to DoneAt).
	ETA      string     `json:"eta,omitempty"`
	ETAAt    *time.Time `json:"eta_at,omitempty"`
	Elapsed  string     `json:"elapsed,omitempty"`
	Duration string     `json:"duration,omitempty"`
	Done     bool       `json:"done"`
	// Redeemed counts the campaign's coupons used (the receiver's
	// notifications, enqueuer redemptions sync), RedeemedAmount their fen;
	// RedemptionRate is Redeemed of Succeeded and MeanToRedemption the
	// mean time from send to use.
	Redeemed         int64   `json:"redeemed"`
	RedeemedAmount   int64   `json:"redeemed_amount"`
	RedemptionRate   float64 `json:"redemption_rate"`
	MeanToRedemption string  `json:"mean_time_to_redemption,omitempty"`
	// Expected is how many sends the campaign's last successful enqueue
	// counted; Missing how many records fewer Redis holds (it lost
	// writes), and Warning what to do about it, "" when none is missing.
	Expected int64  `json:"expected"`
	Missing  int64  `json:"missing"`
	Warning  string `json:"warning,omitempty"`
	// Skipped is how many rows of its file the last complete enqueue
	// skipped as invalid (they are in no count), SkippedRows the first.
	Skipped     int64    `json:"skipped_invalid_rows"`
	SkippedRows []string `json:"skipped_rows,omitempty"`
	// Orphans counts its sends whose record waits while asynq holds no
	// live task for them (deleted or archived in asynqmon, or lost): no
	// worker will run them until the sweeper queues them again. Among the
	// records read (ReasonsFrom); OrphanSample lists the first few
	// out_request_nos.
	Orphans      int64    `json:"orphans"`
	OrphanSample []string `json:"orphan_sample,omitempty"`
	// Retention is how long the records are kept once the campaign has
	// settled; ExpiresAt, once it has, when they go (then only its
	// tombstone is left); Report where its report was archived.
	Retention string     `json:"retention"`
	ExpiresAt *time.Time `json:"expires_at,omitempty"`
	Report    string     `json:"archived_report,omitempty"`
	Links     Links      `json:"links"`
	// Control is an operator's action in force: "running", "paused" or
	// "cancelled".
	Control string `json:"control"`
	// StartAt is the scheduled start (enqueuer campaign --start-at), and
	// Scheduled how many sends wait for it while it is in the future.
	StartAt   *time.Time `json:"start_at,omitempty"`
	Scheduled int64      `json:"scheduled"`
	// DoneAt is when the campaign was found to have nothing left to do
	// (package notify), once it has.
	DoneAt *time.Time `json:"done_at,omitempty"`
	// Actions is its audit trail, oldest first: pauses, resumes, cancels,
	// retries, by whom and how many sends each touched. Only for one
	// campaign (its page, its API), not in lists.
	Actions []idempotency.Action `json:"actions,omitempty"`

	// State is whether it is moving and, if not, why (stateOf): State one
	// of the State* constants, StateReason a sentence. Workers is the
	// number of live workers serving its queue (-1: unread).
	campaignState
	Workers int `json:"live_workers"`
	// Stocks are the stocks its sends draw on (from the records: on lists
	// from the first listSample of them), each with its open breaker and
	// the remedy; only breakers of these stocks (and the merchant's) show.
	Stocks []Stock `json:"stocks"`
	// Reasons are the most frequent answers (state, code, message) of its
	// failed, retrying, held and unknown sends, read from the records:
	// ReasonsFrom of them (fewer than Total when the campaign is larger
	// than a page reads, see listSample and detailSample).
	Reasons     []Reason `json:"reasons"`
	ReasonsFrom int      `json:"reasons_from_records"`
	// ReasonsPartial: the records read were a sample and some sends have
	// a reason, so the reasons shown may miss some.
	ReasonsPartial bool `json:"reasons_partial,omitempty"`
	// CSVStates are the states, other than succeeded and pending, that
	// some of its sends are in: the card links to the report of each
	// (report.csv?state=…).
	CSVStates []string `json:"-"`
	// ChangedAt is when a send of it last changed state.
	ChangedAt  *time.Time `json:"changed_at,omitempty"`
	ChangedAgo string     `json:"-"`

	// For the pages: the states in status order, the codes sorted.
	States []Count `json:"-"`
	Codes  []Count `json:"-"`
}

// Count is one labelled number.
type Count struct {
	Label string
	N     int64
}

// Links are a campaign's pages.
type Links struct {
	Page   string `json:"page"`
	API    string `json:"api"`
	Report string `json:"report"`
	Queue  string `json:"queue"`
}

// Merchant is what the workers of one merchant share.
type Merchant struct {
	MchID string `json:"mchid"`
	// Rates is the current shared rate per endpoint, calls per second
	// (lower than Limits after WeChat answered 429).
	Rates map[ratelimit.Endpoint]float64 `json:"shared_rates"`
	// Limits is the workers' configured limit, as they wrote it to Redis;
	// Ceilings the real limit learned from WeChat's 429s (0: none).
	Limits       map[ratelimit.Endpoint]float64 `json:"limits"`
	Ceilings     map[ratelimit.Endpoint]float64 `json:"learned_ceilings"`
	OpenBreakers []Breaker                      `json:"open_breakers"`
	// OtherBreakers, on one campaign's page and API, counts the merchant's
	// open breakers left out of OpenBreakers because they hold none of its
	// stocks.
	OtherBreakers int `json:"other_open_breakers,omitempty"`
}

// holding keeps in m only the breakers that hold c: its stocks' and the
// merchant's own, so that a dry stock of another campaign does not show
// on this one's page.
func holding(m Merchant, c Campaign) Merchant {
	mine := map[string]bool{breaker.Merchant: true}
	for _, st := range c.Stocks {
		mine[st.StockID] = true
	}
	kept := []Breaker{}
	for _, b := range m.OpenBreakers {
		if mine[b.StockID] {
			kept = append(kept, b)
		} else {
			m.OtherBreakers++
		}
	}
	m.OpenBreakers = kept
	return m
}

// Breaker is an open breaker: a stock's, or (StockID "") the merchant's,
// open while WeChat refuses its signature.
type Breaker struct {
	StockID   string    `json:"stock_id"`
	Reason    string    `json:"reason"` // WeChat's answer that opened it, "CODE: message"
	OpenedAt  time.Time `json:"opened_at"`
	NextProbe time.Time `json:"next_probe"`
	Interval  string    `json:"interval"`
	Probes    int       `json:"probes"`
	// NextProbeIn is NextProbe from now, "40 s" ("now" once due).
	NextProbeIn string `json:"next_probe_in"`
}

// endpoints are the sends whose rate the pages show.
var endpoints = tasks.Endpoints()

// look is what one request reads once for all the campaigns it shows:
// the live workers and each merchant's open breakers.
type look struct {
	now      time.Time
	workers  int
	read     bool
	breakers map[string][]breaker.State
}

// workerCount counts the live asynq servers (their heartbeat is fresh:
// asynq drops a server's entry once it stops beating) that serve one of
// our queues; -1 if the list cannot be read.
func (s *Server) workerCount() int {
	servers, err := s.inspector.Servers()
	if err != nil {
		s.log.Warn("monitor: listing asynq servers", "err", err)
		return -1
	}
	ours := map[string]bool{tasks.WokenQueue(s.queue): true}
	for _, q := range tasks.ShardQueues(s.queue, s.queueShards) {
		ours[q] = true
	}
	// A worker process runs two asynq servers (its queues, their woken
	// queues): it counts once.
	procs := map[string]bool{}
	for _, srv := range servers {
		if srv.Status != "active" {
			continue // stopped: it takes no new task
		}
		for q := range srv.Queues {
			if ours[q] {
				procs[fmt.Sprintf("%s\x00%d", srv.Host, srv.PID)] = true
				break
			}
		}
	}
	return len(procs)
}

func (s *Server) newLook() *look {
	return &look{now: time.Now(), breakers: map[string][]breaker.State{}}
}

func (s *Server) openBreakers(ctx context.Context, lk *look, mchID string) ([]breaker.State, error) {
	if b, ok := lk.breakers[mchID]; ok {
		return b, nil
	}
	b, err := s.breakers.Open(ctx, mchID)
	if err != nil {
		return nil, err
	}
	lk.breakers[mchID] = b
	return b, nil
}

// campaign reads one campaign, with its audit trail if detail; ok is
// false if it is unknown.
func (s *Server) campaign(ctx context.Context, name string, detail bool) (c Campaign, ok bool, err error) {
	return s.campaignWith(ctx, s.newLook(), name, detail)
}

func (s *Server) campaignWith(ctx context.Context, lk *look, name string, detail bool) (c Campaign, ok bool, err error) {
	if tasks.ValidateCampaign(name) != nil {
		return Campaign{}, false, nil // no such campaign can exist
	}
	meta, err := s.store.Campaign(ctx, name)
	if err != nil || meta.Name == "" {
		return Campaign{}, false, err
	}
	st, err := s.store.Status(ctx, name)
	if err != nil {
		return Campaign{}, false, err
	}
	c = s.view(meta, st)
	if !lk.read {
		lk.workers, lk.read = s.workerCount(), true
	}
	limit := listSample
	if detail {
		limit = detailSample
	}
	sc, err := s.scanCached(ctx, name, st.ChangedAt, limit)
	if err != nil {
		return Campaign{}, false, err
	}
	open, err := s.openBreakers(ctx, lk, meta.MchID)
	if err != nil {
		return Campaign{}, false, err
	}
	if !c.Done {
		orphans, err := s.orphans(ctx, name, sc.waiting, lk.now)
		if err != nil {
			return Campaign{}, false, err
		}
		c.Orphans = int64(len(orphans))
		c.OrphanSample = orphans[:min(len(orphans), maxOrphanSample)]
	} else {
		s.forgetOrphans(name) // a done campaign waits for no task
	}
	s.judge(&c, st, sc, open, lk)
	if detail {
		if c.Actions, err = s.store.Audit(ctx, name); err != nil {
			return Campaign{}, false, err
		}
	}
	return c, true, nil
}

// campaigns reads every campaign: those still running first, then by
// creation, newest first.
func (s *Server) campaigns(ctx context.Context) ([]Campaign, error) {
	names, err := s.store.Campaigns(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]Campaign, 0, len(names))
	lk := s.newLook()
	for _, name := range names {
		c, ok, err := s.campaignWith(ctx, lk, name, false)
		if err != nil {
			return nil, err
		}
		if ok {
			out = append(out, c)
		}
	}
	sort.SliceStable(out, func(i, j int) bool {
		if out[i].Done != out[j].Done {
			return !out[i].Done
		}
		return out[i].CreatedAt.After(out[j].CreatedAt)
	})
	return out, nil
}

func (s *Server) view(meta idempotency.Campaign, st idempotency.Status) Campaign {
	c := Campaign{
		Name: meta.Name, MchID: meta.MchID, CreatedAt: meta.CreatedAt.UTC(), Deadline: meta.Deadline.UTC(),
		Total: st.Total, Succeeded: st.ByState[idempotency.Succeeded], Failed: st.ByState[idempotency.Failed],
		Unknown: st.ByState[idempotency.Unknown], Cancelled: st.ByState[idempotency.Cancelled], Waiting: campaignctl.Waiting(st),
		ByState: map[string]int64{}, FailedByCode: map[string]int64{}, Control: string(meta.Control),
		Rate: st.Rate, Rate10s: st.Rate10s, FailRate: st.FailRate, FailRate10s: st.FailRate10s, Done: st.Done(),
		Redeemed: st.Redeemed, RedeemedAmount: st.RedeemedAmount, RedemptionRate: st.RedemptionRate(),
		Expected: st.Expected, Missing: st.Missing(), Skipped: meta.Skipped, SkippedRows: meta.SkippedRows,
		Retention: meta.Retention.String(), Report: meta.Report,
	}
	if !meta.ExpiresAt.IsZero() {
		at := meta.ExpiresAt.UTC()
		c.ExpiresAt = &at
	}
	if st.Redeemed > 0 {
		c.MeanToRedemption = st.MeanTimeToRedemption().Round(time.Second).String()
	}
	if c.Control == "" {
		c.Control = "running"
	}
	if !meta.StartAt.IsZero() {
		at := meta.StartAt.UTC()
		c.StartAt = &at
		if time.Now().Before(at) {
			// Before its start, every send not yet processed waits for it.
			c.Scheduled = st.ByState[idempotency.Pending]
		}
	}
	if !meta.DoneAt.IsZero() {
		at := meta.DoneAt.UTC()
		c.DoneAt = &at
	}
	if c.Missing > 0 {
		c.Warning = st.MissingAdvice()
	}
	c.Finished = c.Succeeded + c.Failed + c.Cancelled
	c.Percent = percent(c.Finished, c.Total)
	for _, state := range idempotency.States {
		c.ByState[string(state)] = st.ByState[state]
		c.States = append(c.States, Count{string(state), st.ByState[state]})
	}
	for code, n := range st.FailedByCode {
		c.FailedByCode[code] = n
		c.Codes = append(c.Codes, Count{code, n})
	}
	sort.Slice(c.Codes, func(i, j int) bool { return c.Codes[i].Label < c.Codes[j].Label })
	esc := url.PathEscape(meta.Name)
	c.Links = Links{
		Page:   "/campaigns/" + esc,
		API:    "/api/campaigns/" + esc,
		Report: "/api/campaigns/" + esc + "/report.csv",
		Queue:  s.queueLink(s.queue),
	}
	return c
}

func (s *Server) queueLink(queue string) string {
	return RootPath + "/queues/" + url.PathEscape(queue)
}

// percent is n of total, truncated to 0.1, so that 100.0 means all.
func percent(n, total int64) float64 {
	if total <= 0 {
		return 0
	}
	return math.Floor(1000*float64(n)/float64(total)) / 10
}

// merchant reads the shared rate and the open breakers of mchID.
func (s *Server) merchant(ctx context.Context, mchID string) (Merchant, error) {
	m := Merchant{MchID: mchID, Rates: map[ratelimit.Endpoint]float64{}, Limits: map[ratelimit.Endpoint]float64{},
		Ceilings: map[ratelimit.Endpoint]float64{}, OpenBreakers: []Breaker{}}
	for _, ep := range endpoints {
		sh, err := s.limiter.Fleet(ctx, mchID, ep)
		if err != nil {
			return m, err
		}
		m.Rates[ep], m.Limits[ep], m.Ceilings[ep] = sh.Rate, sh.Limit, sh.Ceiling
	}
	open, err := s.breakers.Open(ctx, mchID)
	if err != nil {
		return m, err
	}
	sort.Slice(open, func(i, j int) bool { return open[i].StockID < open[j].StockID })
	for _, b := range open {
		m.OpenBreakers = append(m.OpenBreakers, *breakerView(b, time.Now()))
	}
	return m, nil
}

// merchants reads the configured merchant, then those of the campaigns.
func (s *Server) merchants(ctx context.Context, cs []Campaign) ([]Merchant, error) {
	var ids []string
	seen := map[string]bool{}
	add := func(id string) {
		if id != "" && !seen[id] {
			seen[id] = true
			ids = append(ids, id)
		}
	}
	add(s.mchID)
	rest := make([]string, 0, len(cs))
	for _, c := range cs {
		rest = append(rest, c.MchID)
	}
	sort.Strings(rest)
	for _, id := range rest {
		add(id)
	}
	out := make([]Merchant, 0, len(ids))
	for _, id := range ids {
		m, err := s.merchant(ctx, id)
		if err != nil {
			return nil, err
		}
		out = append(out, m)
	}
	return out, nil
}

// Queue is one asynq queue as the index page lists it.
type Queue struct {
	Name                                             string
	Size, Pending, Active, Scheduled, Retry, Archive int
	Paused                                           bool
	Link                                             string
}

// queues lists asynq's queues; the configured one is listed even before
// it exists, so that its link is there.
func (s *Server) queues() ([]Queue, error) {
	names, err := s.inspector.Queues()
	if err != nil {
		return nil, err
	}
	found := false
	for _, n := range names {
		found = found || n == s.queue
	}
	if !found {
		names = append(names, s.queue)
	}
	sort.Strings(names)
	out := make([]Queue, 0, len(names))
	for _, n := range names {
		q := Queue{Name: n, Link: s.queueLink(n)}
		if info, err := s.inspector.GetQueueInfo(n); err == nil {
			q.Size, q.Pending, q.Active, q.Scheduled, q.Retry, q.Archive = info.Size, info.Pending, info.Active, info.Scheduled, info.Retry, info.Archived
			q.Paused = info.Paused
		}
		out = append(out, q)
	}
	return out, nil
}

// Tally sets the campaigns' sends not yet settled beside the tasks asynq
// holds in our queues, so that the two counts an on-call engineer sees
// (ours and asynqmon's) can be told apart: they are equal when every send
// that waits has exactly one task.
type Tally struct {
	// Waiting is every campaign's sends not settled and not unknown
	// (pending, in flight, retrying, held); Orphans those among them whose
	// task asynq no longer holds.
	Waiting int64 `json:"waiting_sends"`
	Orphans int64 `json:"orphans"`
	// Tasks is what asynq holds live in our queues (pending, active,
	// scheduled, retry); Archived what it gave up on, apart.
	Tasks    int64 `json:"live_tasks"`
	Archived int64 `json:"archived_tasks"`
	// Why says, in words, why the two differ ("" when they do not).
	Why string `json:"why,omitempty"`
}

// tally compares cs with qs, our queues among asynq's.
func (s *Server) tally(cs []Campaign, qs []Queue) Tally {
	var t Tally
	for _, c := range cs {
		if !c.Done {
			t.Waiting += max(0, c.Total-c.Finished-c.Unknown)
		}
		t.Orphans += c.Orphans
	}
	ours := map[string]bool{}
	for _, q := range tasks.ShardQueues(s.queue, s.queueShards) {
		ours[q], ours[tasks.WokenQueue(q)] = true, true
	}
	for _, q := range qs {
		if ours[q.Name] {
			t.Tasks += int64(q.Pending + q.Active + q.Scheduled + q.Retry)
			t.Archived += int64(q.Archive)
		}
	}
	t.Why = tallyWhy(t)
	return t
}

// tallyWhy explains a difference between sends waiting and live tasks.
func tallyWhy(t Tally) string {
	switch d := t.Waiting - t.Tasks; {
	case d > 0 && t.Orphans > 0:
		return fmt.Sprintf("%s more sends wait than asynq holds tasks: %s are orphans (their task was deleted or lost; see their campaigns), "+
			"the rest are registered a moment before their task is queued, or orphans not yet confirmed", thousands(d), thousands(t.Orphans))
	case d > 0:
		return fmt.Sprintf("%s more sends wait than asynq holds tasks: sends registered a moment before their task is queued, "+
			"or orphans (a task deleted or lost) that the campaign pages show once confirmed", thousands(d))
	case d < 0:
		return fmt.Sprintf("asynq holds %s more tasks than sends wait: copies queued by a resume or the sweeper (the record lets one call through), "+
			"tasks of sends already settled that asynq has not let go yet (a dead worker's, until asynq's recoverer), or tasks of campaigns whose records expired", thousands(-d))
	}
	return ""
}
