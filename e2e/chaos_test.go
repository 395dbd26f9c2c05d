package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/sandbox"
	"github.com/couponflow/dispatcher/internal/tasks"
)

// chaosPlan sizes one chaos run. The short plan is what CI runs; CHAOS_LONG=1
// runs the long one (the size of the run that found issue 8).
type chaosPlan struct {
	usersA, usersB int           // recipients of the two campaigns
	rate           int           // the merchant's favor_send limit, per second
	phase          time.Duration // faults last this long
	killFor        time.Duration // workers are killed this long
	killEvery      [2]time.Duration
	redisDown      time.Duration // how long Redis stays dead
	burst, storm   time.Duration // 100% errors; the 429 storm
	deadline       time.Duration // campaign B's deadline, from the workers' start
	timeout        time.Duration // everything done by then, from the workers' start
}

var (
	// Retries join the back of the queue, so the faults last as long as
	// the sending (about 45 s here) for resends to meet them too.
	shortChaos = chaosPlan{usersA: 2000, usersB: 1200, rate: 100, phase: 48 * time.Second, killFor: 40 * time.Second,
		killEvery: [2]time.Duration{5 * time.Second, 10 * time.Second}, redisDown: time.Second,
		burst: 2 * time.Second, storm: 3 * time.Second, deadline: 66 * time.Second, timeout: 4 * time.Minute}
	longChaos = chaosPlan{usersA: 14000, usersB: 4000, rate: 150, phase: 150 * time.Second, killFor: 140 * time.Second,
		killEvery: [2]time.Duration{15 * time.Second, 20 * time.Second}, redisDown: 3 * time.Second,
		burst: 3 * time.Second, storm: 5 * time.Second, deadline: 180 * time.Second, timeout: 10 * time.Minute}
)

// The record is the truth: two campaigns run at once through three
// workers while a random worker is SIGKILLed and restarted every few
// seconds, Redis is SIGKILLed once and restarted from its AOF, the sandbox
// fails calls before and after issuing (answer 500, and connection
// dropped), has a burst of 100% errors and a 429 storm; campaign B's stock
// runs dry at 60% of its recipients, is topped up to 90% and resumed, runs
// dry again, and the campaign's deadline passes. At the end, for every
// recipient, the report agrees with the sandbox's ledger: succeeded with
// the coupon the ledger holds for its out_request_no, or failed and the
// ledger holds none; nothing left in flight, waiting or unknown (after
// enqueuer reconcile); no user with two coupons of a stock; nobody missing;
// and status says what the report says. Along the way no worker may exit
// by itself (one is started while Redis is down), and no delivery may
// record a wait while asynq archives its task.
//
// CHAOS_LONG=1 runs a bigger, longer campaign; CHAOS_SEED repeats a run's
// kill schedule; CHAOS_LOG_DIR keeps every worker process's log.
func TestChaosRecordMatchesLedger(t *testing.T) {
	t.Parallel()
	plan := shortChaos
	if os.Getenv("CHAOS_LONG") == "1" {
		plan = longChaos
	}
	seed := uint64(time.Now().UnixNano())
	if s, err := strconv.ParseUint(os.Getenv("CHAOS_SEED"), 10, 64); err == nil {
		seed = s
	}
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	t.Logf("chaos plan %+v, seed %d (CHAOS_SEED=%d repeats the kill schedule)", plan, seed, seed)

	r := newRig(t, "--appendonly", "yes", "--appendfsync", "everysec")
	c := &chaos{r: r, plan: plan, rng: rng, sends: map[string]int{}}
	r.sb.OnRequest(c.hook)

	// Two stocks: A covers everyone, B 60% of its recipients.
	budgetB := int64(plan.usersB) * 6 / 10
	topUpB := int64(plan.usersB)*9/10 - budgetB
	stockA, err := r.sb.CreateStock(sandbox.StockSpec{Kind: "favor", Budget: int64(plan.usersA), CouponValue: 100, CouponMinimum: 100})
	if err != nil {
		t.Fatal(err)
	}
	stockB, err := r.sb.CreateStock(sandbox.StockSpec{Kind: "favor", Budget: budgetB, CouponValue: 100, CouponMinimum: 100})
	if err != nil {
		t.Fatal(err)
	}
	// Half of B's recipients are in A too: one user, two campaigns at once.
	usersA := chaosUsers(0, plan.usersA)
	usersB := chaosUsers(plan.usersA-plan.usersB/2, plan.usersB)
	c.campaigns = []*chaosCampaign{
		{name: "chaos-a", stock: stockA.ID, openids: usersA},
		{name: "chaos-b", stock: stockB.ID, openids: usersB},
	}

	// Enqueue both at once; B's deadline falls after its second dry spell.
	start := time.Now()
	deadlineB := start.Add(plan.deadline).Truncate(time.Second).Add(time.Second)
	var enq []*proc
	for _, cp := range c.campaigns {
		path := filepath.Join(r.dir, cp.name+".csv")
		if err := os.WriteFile(path, []byte("openid\n"+strings.Join(cp.openids, "\n")+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		args := []string{"campaign", "--file", path, "--stock-id", cp.stock, "--campaign", cp.name, "--progress", "none"}
		if cp.name == "chaos-b" {
			// Few retries: a send ends unknown at its second ambiguous
			// outcome, so that some do, for reconcile to settle.
			args = append(args, "--deadline", deadlineB.Format(time.RFC3339), "--max-retry", "2")
		}
		enq = append(enq, r.start(filepath.Join(binDir, "enqueuer"), args...))
	}
	for i, p := range enq {
		<-p.done
		cp := c.campaigns[i]
		want := fmt.Sprintf("enqueued %d, duplicates 0, invalid 0", len(cp.openids))
		if p.err != nil || !strings.Contains(p.out.String(), want) {
			t.Fatalf("enqueuer campaign %s: %v\n%s", cp.name, p.err, p.out.String())
		}
	}

	c.workerArgs = []string{"--concurrency", "8", "--call-timeout", "3s",
		"--breaker-probe", "500ms", "--breaker-probe-max", "2s",
		"--rate-wait", "200ms", "--rate-wait-max", "2s", "--rate-max-wait", "1s",
		"--rate-limits", fmt.Sprintf("favor_send=%d/s", plan.rate),
		"--sweep-every", "2s", "--sweep-stall", "10s", "--http-addr=127.0.0.1:0"}
	c.base = sandbox.Faults{ErrorRate: 0.10, CommitFailRate: 0.05, CommitFailMode: sandbox.CommitFail500,
		Latency: 30 * time.Millisecond, LatencyRate: 1}
	r.sb.SetFaults(c.base)
	t.Cleanup(c.saveLogs) // after the workers stop
	t.Cleanup(c.stopWorkers)
	c.t0 = time.Now()
	for _, name := range []string{"w1", "w2", "w3"} {
		c.workers = append(c.workers, &chaosWorker{name: name})
	}
	for _, w := range c.workers {
		c.startWorker(w)
	}

	c.run(stockB.ID, topUpB, deadlineB)
	elapsed := time.Since(c.t0)

	// Unknown sends are settled by reconcile: WeChat's answer to the
	// identical request.
	unknown := int64(0)
	for _, cp := range c.campaigns {
		st, err := r.store.Status(context.Background(), cp.name)
		if err != nil {
			t.Fatal(err)
		}
		if n := st.ByState[idempotency.Unknown]; n > 0 {
			unknown += n
			out, code := r.enqueuer("reconcile", "--campaign", cp.name)
			c.event("%s: %d unknown; enqueuer reconcile exited %d: %s", cp.name, n, code, tail(out, 1))
			if code != 0 {
				t.Errorf("enqueuer reconcile --campaign %s exited %d with %d sends unknown:\n%s", cp.name, code, n, tail(out, 20))
			}
		}
	}

	if unknown == 0 {
		// B's sends end unknown at their second ambiguous outcome: with 15%
		// of calls ambiguous and a burst of 100%, dozens do in every run.
		t.Errorf("scenario: no send ended unknown, so reconcile went unexercised")
	}
	c.check(stockB.ID, budgetB+topUpB)
	t.Logf("chaos run: %s from the workers' start to every send done; timeline:\n%s", elapsed.Round(time.Second), c.timeline())
	if t.Failed() {
		c.dumpWorkers()
	}
}

// saveLogs writes every worker process's log to CHAOS_LOG_DIR, if set.
func (c *chaos) saveLogs() {
	dir := os.Getenv("CHAOS_LOG_DIR")
	if dir == "" {
		return
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		c.r.t.Log(err)
		return
	}
	for _, w := range c.workers {
		if w.p == nil {
			continue
		}
		for g, text := range append(append([]string(nil), w.logs...), w.p.out.String()) {
			if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("%s-gen%d.log", w.name, g+1)), []byte(text), 0o644); err != nil {
				c.r.t.Log(err)
			}
		}
	}
	c.r.t.Logf("worker logs written to %s", dir)
}

// chaosUsers returns n openids numbered from first.
func chaosUsers(first, n int) []string {
	ids := make([]string, n)
	for i := range ids {
		ids[i] = fmt.Sprintf("ochaos_%06d", first+i)
	}
	return ids
}

type chaosCampaign struct {
	name, stock string
	openids     []string
	done        bool
}

// chaosWorker is one of the three worker slots; each kill starts a new
// generation of its process, and the logs of every generation are kept.
type chaosWorker struct {
	name   string
	gen    int
	p      *proc
	killed bool     // p was SIGKILLed by the test
	logs   []string // earlier generations
}

type chaos struct {
	r          *rig
	plan       chaosPlan
	rng        *rand.Rand
	campaigns  []*chaosCampaign
	workers    []*chaosWorker
	workerArgs []string
	base       sandbox.Faults
	t0         time.Time
	doneAt     time.Time // every send done (before reconcile)
	events     []string

	mu    sync.Mutex
	sends map[string]int // sends the sandbox received, by out_request_no
}

func (c *chaos) event(format string, args ...any) {
	c.events = append(c.events, fmt.Sprintf("%7.1fs  %s", time.Since(c.t0).Seconds(), fmt.Sprintf(format, args...)))
}

func (c *chaos) timeline() string { return strings.Join(c.events, "\n") }

// hook counts the cash-coupon sends that reach the sandbox, by out_request_no.
func (c *chaos) hook(req sandbox.RecordedRequest) {
	if req.Method != "POST" || !strings.HasPrefix(req.Path, "/v3/marketing/favor/") {
		return
	}
	var body struct {
		OutRequestNo string `json:"out_request_no"`
	}
	if json.Unmarshal(req.Body, &body) == nil {
		c.mu.Lock()
		c.sends[body.OutRequestNo]++
		c.mu.Unlock()
	}
}

func (c *chaos) sendsOf(orn string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.sends[orn]
}

func (c *chaos) startWorker(w *chaosWorker) {
	if w.p != nil {
		w.logs = append(w.logs, w.p.out.String())
	}
	w.gen++
	w.killed = false
	w.p = c.r.start(filepath.Join(binDir, "worker"), c.workerArgs...)
}

func (w *chaosWorker) running() bool {
	select {
	case <-w.p.done:
		return false
	default:
		return true
	}
}

func (c *chaos) kill(w *chaosWorker) {
	w.killed = true
	w.p.signal(syscall.SIGKILL)
	<-w.p.done
}

func (c *chaos) stopWorkers() {
	for _, w := range c.workers {
		if w.p == nil {
			continue
		}
		w.p.signal(syscall.SIGTERM)
		select {
		case <-w.p.done:
		case <-time.After(30 * time.Second):
			w.p.signal(syscall.SIGKILL)
			<-w.p.done
		}
	}
}

func (c *chaos) setFaults(what string, f sandbox.Faults) {
	c.r.sb.SetFaults(f)
	c.event("faults: %s", what)
}

// run drives the chaos from the test's goroutine (so that Fatal works)
// until both campaigns are done: kills, Redis, faults, the budget of stock
// B.
func (c *chaos) run(stockB string, topUp int64, deadlineB time.Time) {
	t, r, p := c.r.t, c.r, c.plan
	at := func(frac float64) time.Time { return c.t0.Add(time.Duration(frac * float64(p.phase))) }
	nextKill := func(from time.Time) time.Time {
		return from.Add(p.killEvery[0] + time.Duration(c.rng.Int64N(int64(p.killEvery[1]-p.killEvery[0]))))
	}
	// A step with after > 0 ends its predecessor: it runs that long after
	// the predecessor actually ran, so that a loaded machine running late
	// cannot shrink a fault's window to nothing.
	type step struct {
		when  time.Time
		do    func()
		after time.Duration
	}
	redisUp := true
	storm := c.base
	storm.RateLimit = float64(p.rate) / 5
	burst := c.base
	burst.ErrorRate = 1
	drop := c.base
	drop.CommitFailMode = sandbox.CommitFailDrop
	either := c.base
	either.CommitFailMode = ""
	steps := []step{
		{at(0.2), func() {
			r.redis.Kill()
			redisUp = false
			c.event("redis SIGKILLed")
			// A worker started while Redis is down waits for it.
			w := c.workers[c.rng.IntN(len(c.workers))]
			c.kill(w)
			c.event("worker %s (gen %d) SIGKILLed, and started again while redis is down", w.name, w.gen)
			c.startWorker(w)
		}, 0},
		{at(0.2).Add(p.redisDown), func() { r.redis.Restart(); redisUp = true; c.event("redis restarted from its AOF") }, p.redisDown},
		{at(0.3), func() { c.setFaults("100% SYSTEM_ERROR burst", burst) }, 0},
		{at(0.3).Add(p.burst), func() { c.setFaults("burst over; commit-fail mode 500", c.base) }, p.burst},
		{at(0.4), func() { c.setFaults("commit-fail mode drop", drop) }, 0},
		{at(0.5), func() {
			s := drop
			s.RateLimit = storm.RateLimit
			c.setFaults(fmt.Sprintf("429 storm: rate_limit %g/s", s.RateLimit), s)
		}, 0},
		{at(0.5).Add(p.storm), func() { c.setFaults("storm over; commit-fail mode drop", drop) }, p.storm},
		{at(0.7), func() { c.setFaults("commit-fail mode 500 or drop at random", either) }, 0},
		{at(1), func() { c.setFaults("all faults off", sandbox.Faults{}) }, 0},
	}

	kill := nextKill(c.t0)
	var lastKill time.Time
	dry := 0 // times stock B ran dry
	var dryAt time.Time
	toppedUp, deadlinePassed := false, false
	for {
		now := time.Now()
		for len(steps) > 0 && !now.Before(steps[0].when) {
			steps[0].do()
			steps = steps[1:]
			if len(steps) > 0 && steps[0].after > 0 {
				steps[0].when = time.Now().Add(steps[0].after)
			}
		}
		// Workers: a random one is SIGKILLed and started again at once.
		if now.Before(c.t0.Add(p.killFor)) && !now.Before(kill) {
			w := c.workers[c.rng.IntN(len(c.workers))]
			if w.running() {
				c.kill(w)
				c.event("worker %s (gen %d) SIGKILLed", w.name, w.gen)
				lastKill = now
			}
			kill = nextKill(now)
		}
		for _, w := range c.workers {
			select {
			case <-w.p.done:
				if !w.killed {
					c.event("worker %s (gen %d) exited by itself: %v", w.name, w.gen, w.p.err)
					t.Errorf("worker %s (gen %d) exited by itself (%v); its log ends:\n%s", w.name, w.gen, w.p.err, tail(w.p.out.String(), 10))
					w.killed = true
				}
				c.startWorker(w)
			default:
			}
		}
		// Stock B: runs dry, is topped up and resumed, runs dry again.
		if k, _ := r.sb.Stock(stockB); k.Remaining == 0 && (dry == 0 || toppedUp && dry == 1) {
			dry++
			dryAt = now
			c.event("stock B ran dry (%d issued, budget %d)", k.Issued, k.Budget)
		}
		if dry == 1 && !toppedUp && redisUp && now.After(dryAt.Add(2*time.Second)) {
			if err := r.sb.TopUp(stockB, topUp); err != nil {
				t.Fatal(err)
			}
			out, code := r.enqueuer("stock", "resume", "--stock-id", stockB)
			if code != 0 || !strings.Contains(out, "breaker closed") {
				t.Fatalf("enqueuer stock resume exited %d:\n%s", code, out)
			}
			toppedUp = true
			c.event("stock B topped up by %d; %s", topUp, strings.TrimSpace(out))
		}
		if !now.Before(deadlineB) && !deadlinePassed {
			deadlinePassed = true
			c.event("campaign B's deadline passed")
		}

		if redisUp {
			all := true
			for _, cp := range c.campaigns {
				if !cp.done {
					if st, err := r.store.Status(context.Background(), cp.name); err == nil && st.Done() {
						cp.done = true
						c.event("campaign %s done: %v", cp.name, compact(st))
					}
				}
				all = all && cp.done
			}
			if all && len(steps) == 0 {
				c.doneAt = now
				if !lastKill.IsZero() {
					c.event("every send done, %.1fs after the last worker kill", now.Sub(lastKill).Seconds())
				}
				break
			}
		}
		if now.After(c.t0.Add(p.timeout)) {
			for _, cp := range c.campaigns {
				st, _ := r.store.Status(context.Background(), cp.name)
				c.event("campaign %s at the timeout: %v", cp.name, compact(st))
				c.showStuck(cp)
			}
			t.Logf("timeline:\n%s", c.timeline())
			c.dumpWorkers()
			t.Fatalf("the campaigns were not done %s after the workers started", p.timeout)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if dry < 2 {
		t.Errorf("scenario: stock B ran dry %d times, want twice (once before its top-up, once after)", dry)
	} else if dryAt.After(deadlineB) {
		t.Errorf("scenario: stock B ran dry the second time at %s, after its deadline %s", dryAt.Format(time.TimeOnly), deadlineB.Format(time.TimeOnly))
	}
	if time.Now().Before(deadlineB) {
		t.Errorf("scenario: the campaigns were done before B's deadline")
	}
}

func compact(st idempotency.Status) string {
	var b strings.Builder
	fmt.Fprintf(&b, "total %d", st.Total)
	for _, s := range idempotency.States {
		if n := st.ByState[s]; n != 0 {
			fmt.Fprintf(&b, ", %s %d", s, n)
		}
	}
	if len(st.FailedByCode) > 0 {
		fmt.Fprintf(&b, ", failed by code %v", st.FailedByCode)
	}
	return b.String()
}

// showStuck logs the sends of a campaign that are not done.
func (c *chaos) showStuck(cp *chaosCampaign) {
	rep := c.readReport(cp.name)
	var stuck []map[string]string
	for _, row := range rep {
		if s := idempotency.State(row["state"]); !s.Stopped() {
			stuck = append(stuck, row)
		}
	}
	c.r.t.Logf("campaign %s: %d sends not done", cp.name, len(stuck))
	for i, row := range stuck {
		if i == 10 {
			break
		}
		c.r.t.Logf("  %s", c.describe(row, nil))
	}
}

// readReport runs enqueuer report and returns its rows by column name.
func (c *chaos) readReport(campaign string) []map[string]string {
	rows := c.r.report(campaign)
	if len(rows) == 0 {
		c.r.t.Fatalf("report of %s is empty, not even a header", campaign)
	}
	head := rows[0]
	for _, col := range []string{"out_request_no", "openid", "state", "coupon_id", "error_code", "error_message", "attempts", "last_attempt"} {
		if !contains(head, col) {
			c.r.t.Fatalf("report of %s has no column %s: %v", campaign, col, head)
		}
	}
	out := make([]map[string]string, 0, len(rows)-1)
	for _, row := range rows[1:] {
		m := map[string]string{}
		for i, col := range head {
			if i < len(row) {
				m[col] = row[i]
			}
		}
		out = append(out, m)
	}
	return out
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// describe is one report row with what the sandbox saw of it.
func (c *chaos) describe(row map[string]string, ledger map[string]sandbox.LedgerCoupon) string {
	s := fmt.Sprintf("%s openid=%s state=%s coupon=%q code=%s attempts=%s msg=%q; sandbox got %d sends",
		row["out_request_no"], row["openid"], row["state"], row["coupon_id"], row["error_code"], row["attempts"],
		row["error_message"], c.sendsOf(row["out_request_no"]))
	if lc, ok := ledger[row["out_request_no"]]; ok {
		s += fmt.Sprintf(", ledger coupon %s of stock %s for %s issued %s", lc.CouponID, lc.StockID, lc.OpenID, lc.CreateTime)
	}
	return s
}

// logsOf returns the worker log lines that name out_request_no, from every
// generation of every worker.
func (c *chaos) logsOf(orn string, max int) []string {
	var lines []string
	for _, w := range c.workers {
		gens := append(append([]string(nil), w.logs...), w.p.out.String())
		for g, text := range gens {
			for _, line := range strings.Split(text, "\n") {
				if strings.Contains(line, orn) {
					lines = append(lines, fmt.Sprintf("[%s gen %d] %s", w.name, g+1, line))
				}
			}
		}
	}
	sort.SliceStable(lines, func(i, j int) bool { return logTime(lines[i]) < logTime(lines[j]) })
	if len(lines) > max {
		lines = lines[len(lines)-max:]
	}
	return lines
}

// archivedWhileWaiting finds, in every worker's log, a delivery that
// recorded a wait (the send is to be tried again) immediately followed by
// asynq archiving its task ("Retry exhausted"): asynq archives a task whose
// retries are used up whatever the error, so a wait after the last counted
// failure leaves the record waiting with nothing queued. Only the same
// delivery can log both lines within 50 ms: a send's next delivery comes
// after a wait of 100 ms at least plus asynq's one-second forwarding.
func (c *chaos) archivedWhileWaiting() []string {
	var found []string
	for _, w := range c.workers {
		if w.p == nil {
			continue
		}
		for g, text := range append(append([]string(nil), w.logs...), w.p.out.String()) {
			last := map[string]map[string]any{} // by out_request_no, the handler's last line
			for _, line := range strings.Split(text, "\n") {
				var m map[string]any
				if json.Unmarshal([]byte(line), &m) != nil {
					continue
				}
				if orn, ok := archivedTask(m); ok {
					prev := last[orn]
					if prev == nil || prev["msg"] != "will retry" {
						continue
					}
					state, _ := prev["state"].(string)
					if s := idempotency.State(state); s.Stopped() {
						continue
					}
					t1, err1 := time.Parse(time.RFC3339Nano, fmt.Sprint(prev["time"]))
					t2, err2 := time.Parse(time.RFC3339Nano, fmt.Sprint(m["time"]))
					if err1 == nil && err2 == nil && t2.Sub(t1) < 50*time.Millisecond {
						found = append(found, fmt.Sprintf("[%s gen %d] %s: attempt %v %s %v → %s, then archived", w.name, g+1,
							orn, prev["attempt"], prev["outcome"], prev["code"], state))
					}
					continue
				}
				if orn, ok := m["out_request_no"].(string); ok {
					last[orn] = m
				}
			}
		}
	}
	return found
}

// archivedTask reports the out_request_no of a log line that says asynq
// archived a send's task: asynq's own warning, or the worker's info line
// that replaces it.
func archivedTask(m map[string]any) (string, bool) {
	msg, _ := m["msg"].(string)
	id, ok := strings.CutPrefix(msg, "Retry exhausted for task id=")
	if !ok && strings.HasPrefix(msg, "task archived") {
		id, ok = m["task_id"].(string)
	}
	if !ok {
		return "", false
	}
	k, ok := tasks.ParseTaskID(id)
	return k.OutRequestNo, ok
}

func isArchived(m map[string]any) bool {
	_, ok := archivedTask(m)
	return ok
}

// logTime is a JSON log line's "time", for sorting.
func logTime(line string) string {
	if i := strings.Index(line, `"time":"`); i >= 0 {
		rest := line[i+8:]
		if j := strings.IndexByte(rest, '"'); j >= 0 {
			return rest[:j]
		}
	}
	return ""
}

func (c *chaos) dumpWorkers() {
	for _, w := range c.workers {
		if w.p == nil {
			continue
		}
		c.r.t.Logf("worker %s (gen %d) log (tail):\n%s", w.name, w.gen, tail(w.p.out.String(), 25))
	}
}

// check compares every campaign's report with the sandbox's ledger and
// with enqueuer status.
func (c *chaos) check(stockB string, budgetB int64) {
	t := c.r.t
	led := c.r.sb.Ledger()
	byORN := map[string]sandbox.LedgerCoupon{}
	perUser := map[string]int{} // stock + openid
	for _, lc := range led.Coupons {
		if prev, dup := byORN[lc.OutRequestNo]; dup {
			t.Errorf("the ledger has two coupons for out_request_no %s: %s and %s", lc.OutRequestNo, prev.CouponID, lc.CouponID)
		}
		byORN[lc.OutRequestNo] = lc
		perUser[lc.StockID+" "+lc.OpenID]++
	}
	for k, n := range perUser {
		if n > 1 {
			t.Errorf("duplicate: stock and openid %s hold %d coupons", k, n)
		}
	}

	var bad, all []map[string]string
	for _, cp := range c.campaigns {
		rows := c.readReport(cp.name)
		for _, row := range rows {
			row["campaign"] = cp.name
			all = append(all, row)
		}
		counts := map[string]int64{}
		failedBy := map[string]int64{}
		seen := map[string]bool{}
		inReport := map[string]bool{}
		for _, row := range rows {
			orn, state := row["out_request_no"], row["state"]
			counts[state]++
			inReport[orn] = true
			if seen[row["openid"]] {
				t.Errorf("%s: openid %s has two rows", cp.name, row["openid"])
			}
			seen[row["openid"]] = true
			lc, issued := byORN[orn]
			problem := ""
			switch state {
			case string(idempotency.Succeeded):
				switch {
				case !issued:
					problem = "recorded succeeded, but the ledger has no coupon for it"
				case lc.CouponID != row["coupon_id"]:
					problem = "recorded succeeded with another coupon than the ledger's"
				case lc.StockID != cp.stock || lc.OpenID != row["openid"]:
					problem = "the ledger's coupon for its out_request_no is of another stock or user"
				}
			case string(idempotency.Failed):
				failedBy[row["error_code"]]++
				if issued {
					problem = "recorded failed, but the ledger holds a coupon for it"
				} else if cp.stock != stockB {
					problem = "failed although its stock covered everyone and no permanent error was injected"
				} else if row["error_code"] != "NOT_ENOUGH" {
					problem = "failed with a code other than NOT_ENOUGH"
				}
			default:
				problem = "still " + state + " at the end"
			}
			if problem != "" {
				row["problem"] = problem
				bad = append(bad, row)
			}
		}
		// Nobody lost: every recipient has exactly one row.
		missing := 0
		for _, id := range cp.openids {
			if !seen[id] {
				missing++
			}
		}
		if missing > 0 || len(rows) != len(cp.openids) {
			t.Errorf("%s: %d rows in the report for %d recipients; %d recipients missing", cp.name, len(rows), len(cp.openids), missing)
		}
		// Nothing issued that the campaign does not know of.
		issuedHere := 0
		for _, lc := range led.Coupons {
			if lc.StockID != cp.stock {
				continue
			}
			issuedHere++
			if !inReport[lc.OutRequestNo] {
				t.Errorf("%s: the ledger has coupon %s for %s (out_request_no %s), which the report does not list", cp.name, lc.CouponID, lc.OpenID, lc.OutRequestNo)
			}
		}
		if int64(issuedHere) != counts[string(idempotency.Succeeded)] {
			t.Errorf("%s: the ledger holds %d coupons of stock %s, the report %d succeeded", cp.name, issuedHere, cp.stock, counts[string(idempotency.Succeeded)])
		}
		if cp.stock == stockB && int64(issuedHere) != budgetB {
			t.Errorf("scenario: stock B issued %d coupons, its budget after the top-up was %d", issuedHere, budgetB)
		}

		// Status says what the report says.
		out, code := c.r.enqueuer("status", "--campaign", cp.name, "--json")
		var st struct {
			Total        int64            `json:"total"`
			ByState      map[string]int64 `json:"by_state"`
			FailedByCode map[string]int64 `json:"failed_by_code"`
			Done         bool             `json:"done"`
		}
		if code != 0 || json.Unmarshal([]byte(out), &st) != nil {
			t.Errorf("enqueuer status --campaign %s --json exited %d:\n%s", cp.name, code, out)
		} else {
			if st.Total != int64(len(rows)) {
				t.Errorf("%s: status total %d, report %d rows", cp.name, st.Total, len(rows))
			}
			for _, s := range idempotency.States {
				if st.ByState[string(s)] != counts[string(s)] {
					t.Errorf("%s: status counts %d %s, the report %d", cp.name, st.ByState[string(s)], s, counts[string(s)])
				}
			}
			for code, n := range failedBy {
				if st.FailedByCode[code] != n {
					t.Errorf("%s: status counts %d failed %s, the report %d", cp.name, st.FailedByCode[code], code, n)
				}
			}
			for code, n := range st.FailedByCode {
				if failedBy[code] != n {
					t.Errorf("%s: status counts %d failed %s, the report %d", cp.name, n, code, failedBy[code])
				}
			}
			if !st.Done {
				t.Errorf("%s: status says not done", cp.name)
			}
		}
		t.Logf("%s: report %v; failed by code %v", cp.name, counts, failedBy)
	}

	// The scenario happened: every fault was injected.
	for _, f := range []string{"system_error", "commit_fail_500", "commit_fail_drop"} {
		if led.Faults[f] == 0 {
			t.Errorf("scenario: the sandbox never injected %s (faults %v)", f, led.Faults)
		}
	}
	for _, code := range []string{"429 FREQUENCY_LIMIT_EXCEED", "403 NOT_ENOUGH"} {
		if led.Requests[code] == 0 {
			t.Errorf("scenario: the sandbox never answered %s (requests %v)", code, led.Requests)
		}
	}
	kills, panics := 0, 0
	for _, w := range c.workers {
		kills += w.gen - 1
		for _, text := range append(append([]string(nil), w.logs...), w.p.out.String()) {
			panics += strings.Count(text, "panic:")
		}
	}
	if panics > 0 {
		t.Errorf("worker logs show %d panics", panics)
	}
	t.Logf("sandbox: %d coupons; requests %v; faults %v; %d worker restarts", len(led.Coupons), led.Requests, led.Faults, kills)
	if orphaned := c.archivedWhileWaiting(); len(orphaned) > 0 {
		t.Errorf("%d times a delivery recorded a wait and asynq archived its task at once: the send was left waiting with no task, for the sweeper's stall check to find (15 min by default); waits must never use up a task's retries:\n  %s",
			len(orphaned), strings.Join(orphaned[:min(5, len(orphaned))], "\n  "))
	}

	// The tail: the sends the workers finished last (reconcile's later
	// ones aside), and why.
	var byWorkers []map[string]string
	for _, row := range all {
		if at, err := time.Parse(time.RFC3339Nano, row["last_attempt"]); err == nil && !at.After(c.doneAt) {
			byWorkers = append(byWorkers, row)
		}
	}
	sort.Slice(byWorkers, func(i, j int) bool { return byWorkers[i]["last_attempt"] > byWorkers[j]["last_attempt"] })
	for i, row := range byWorkers[:min(5, len(byWorkers))] {
		_, steps := c.trace(row)
		t.Logf("last to finish #%d at %s: %s: %s\n      %s", i+1, row["last_attempt"], row["campaign"], c.describe(row, byORN), steps)
	}

	if len(bad) == 0 {
		return
	}
	byProblem := map[string]int{}
	byStory := map[string]int{}
	for _, row := range bad {
		byProblem[row["campaign"]+": "+row["problem"]]++
		story, _ := c.trace(row)
		byStory[row["campaign"]+" "+row["state"]+" "+row["error_code"]+": "+story]++
	}
	t.Errorf("%d sends whose record disagrees with the ledger or is not final: %v", len(bad), byProblem)
	t.Logf("what the workers logged of them, in order:")
	for story, n := range byStory {
		t.Logf("  %4d × %s", n, story)
	}
	for i, row := range bad {
		if i == 30 {
			t.Logf("… and %d more", len(bad)-30)
			break
		}
		_, steps := c.trace(row)
		t.Logf("%s: %s: %s\n      %s", row["campaign"], row["problem"], c.describe(row, byORN), steps)
		if i < 3 {
			for _, line := range c.logsOf(row["out_request_no"], 12) {
				t.Logf("    %s", line)
			}
		}
	}
}

// trace tells what the workers logged of one send: its outcomes in order,
// as a pattern shared by sends with the same story, and with the workers
// and attempts named.
func (c *chaos) trace(row map[string]string) (pattern, steps string) {
	var pat, st []string
	calls := 0
	for _, line := range c.logsOf(row["out_request_no"], 100) {
		who, js, _ := strings.Cut(line, "] ")
		var m map[string]any
		if json.Unmarshal([]byte(js), &m) != nil {
			continue
		}
		msg, _ := m["msg"].(string)
		outcome, code := fmt.Sprint(m["outcome"]), fmt.Sprint(m["code"])
		var p string
		switch {
		case msg == "sent":
			calls++
			p = "success"
		case msg == "will retry" || msg == "failed permanently":
			calls++
			p = outcome + " " + code + " → " + fmt.Sprint(m["state"])
		case isArchived(m):
			p = "asynq archived the task"
		case msg == "already recorded; not sent again":
			p = "already " + fmt.Sprint(m["state"])
		default:
			p = msg
		}
		pat = append(pat, p)
		if a, ok := m["attempt"]; ok {
			p = fmt.Sprintf("#%v %s", a, p)
		}
		st = append(st, who+"] "+p)
	}
	if lost := c.sendsOf(row["out_request_no"]) - calls; lost > 0 {
		note := fmt.Sprintf("(%d call(s) reached WeChat with no outcome in the worker logs: cut off by a kill, or made by reconcile)", lost)
		pat, st = append(pat, note), append(st, note)
	}
	if len(pat) == 0 {
		pat = []string{"nothing logged"}
	}
	return strings.Join(pat, "; "), strings.Join(st, "; ")
}
