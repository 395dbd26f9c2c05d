package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/ratelimit"
	"github.com/couponflow/dispatcher/internal/sandbox"
	"github.com/couponflow/dispatcher/internal/wechat"
)

// BenchmarkUnknownLimit runs three worker processes (./cmd/worker,
// --concurrency 32 each) left at a limit five times WeChat's real one: the
// sandbox answers 429 above BENCH_UNKNOWN_REAL calls/s (default 100) and
// the workers run with favor_send=5×that. Each run queues
// BENCH_UNKNOWN_SENDS sends (default 2,000) through the producer, then
// starts the workers together; this process polls the sandbox's ledger and
// the shared rate in Redis every 10 ms.
//
//   - 429-share: 429s over all calls of the run.
//   - 429s-2s: 429s in the first 2 s after the first call.
//   - converge-s: from the first 429 to the first poll that read a shared
//     rate at or under the real limit.
//   - 429s-after-10s: the share of calls refused after the first 10 s.
//   - utilisation: 2xx per second, from 1 s after the first 429 to the last
//     send, over the real limit.
//
// worker=this is this tree's worker. With BENCH_BASELINE_REV set (a git
// revision, e.g. main), worker=baseline runs the worker built from that
// revision too, in the same run, for the old figures beside the new.
// limit=known runs this tree's worker configured at the real limit, which
// must not lose utilisation: it is the case where nothing is learned.
func BenchmarkUnknownLimit(b *testing.B) {
	realLimit := envInt(b, "BENCH_UNKNOWN_REAL", 100)
	n := envInt(b, "BENCH_UNKNOWN_SENDS", 2000)
	bins := []struct{ name, bin string }{}
	if rev := os.Getenv("BENCH_BASELINE_REV"); rev != "" {
		bins = append(bins, struct{ name, bin string }{"baseline", buildWorkerAt(b, rev)})
	}
	bins = append(bins, struct{ name, bin string }{"this", buildWorker(b)})
	for _, w := range bins {
		b.Run("worker="+w.name, func(b *testing.B) { runUnknownLimit(b, w.bin, realLimit, 5*realLimit, n) })
	}
	b.Run("limit=known", func(b *testing.B) { runUnknownLimit(b, bins[len(bins)-1].bin, realLimit, realLimit, n) })
}

// ledgerSample is the sandbox's answers and the shared rate at one poll.
type ledgerSample struct {
	at            time.Time
	ok, limited   int64
	rate, ceiling float64
	measuring     bool
}

func runUnknownLimit(b *testing.B, bin string, realLimit, configured, n int) {
	var share, early, converge, late, util, unseen, avoidable float64
	for b.Loop() {
		b.StopTimer()
		r := newDispatchRig(b, n)
		r.sb.SetFaults(sandbox.Faults{RateLimit: float64(realLimit)})
		var posts postTimes
		r.sb.OnRequest(posts.hook)
		mch := r.sb.Env()[wechat.EnvMchID]
		reader := ratelimit.New(r.rdb)
		ctx := context.Background()
		b.StartTimer()
		fleet := make([]*fleetWorker, 3)
		for i := range fleet {
			fleet[i] = startFleetWorker(b, bin, r, strconv.Itoa(i), fmt.Sprintf("favor_send=%d/s", configured))
		}
		var samples []ledgerSample
		deadline := time.Now().Add(3 * time.Minute)
		for {
			led := r.sb.Ledger()
			s := ledgerSample{at: time.Now(), limited: led.Requests[tooMany]}
			for k, v := range led.Requests {
				if strings.HasPrefix(k, "2") {
					s.ok += v
				}
			}
			sh, err := reader.Fleet(ctx, mch, ratelimit.SendCoupon)
			if err != nil {
				b.Fatal(err)
			}
			s.rate, s.ceiling, s.measuring = sh.Rate, sh.Ceiling, sh.Measuring
			samples = append(samples, s)
			if s.ok >= int64(n) {
				break
			}
			if time.Now().After(deadline) {
				b.Fatalf("not done in 3 minutes: %d of %d", s.ok, n)
			}
			time.Sleep(10 * time.Millisecond)
		}
		b.StopTimer()
		// The sandbox answered every send; the workers record the last.
		for {
			st, err := r.store.Status(ctx, r.campaign)
			if err != nil {
				b.Fatal(err)
			}
			if st.ByState[idempotency.Succeeded] == int64(n) {
				break
			}
			if time.Now().After(deadline) {
				b.Fatalf("not every send succeeded: %+v", st.ByState)
			}
			time.Sleep(10 * time.Millisecond)
		}
		for _, w := range fleet {
			w.stop(b)
		}
		r.sb.OnRequest(nil)
		r.check(b)
		calls := readCalls(b, fleet)

		first := posts.first()
		last := samples[len(samples)-1]
		var firstLimited, convergedAt time.Time
		var at2s, at10s ledgerSample
		for _, s := range samples {
			if s.limited > 0 && firstLimited.IsZero() {
				firstLimited = s.at
			}
			if !firstLimited.IsZero() && convergedAt.IsZero() && s.rate <= float64(realLimit) {
				convergedAt = s.at
			}
			if !s.at.After(first.Add(2 * time.Second)) {
				at2s = s
			}
			if !s.at.After(first.Add(10 * time.Second)) {
				at10s = s
			}
		}
		total := last.ok + last.limited
		runShare := float64(last.limited) / float64(total)
		lateShare := float64(last.limited-at10s.limited) / float64(total-at10s.ok-at10s.limited)
		blind, seen, lat := calls.split()
		runConverge := 0.0
		if !convergedAt.IsZero() {
			runConverge = convergedAt.Sub(firstLimited).Seconds()
		}
		// Utilisation from 1 s after the first 429 (or after the first
		// call, when there was none) to the last send.
		from := first.Add(time.Second)
		if !firstLimited.IsZero() {
			from = firstLimited.Add(time.Second)
		}
		var s0 ledgerSample
		for _, s := range samples {
			if !s.at.Before(from) {
				s0 = s
				break
			}
		}
		runUtil := float64(last.ok-s0.ok) / last.at.Sub(s0.at).Seconds() / float64(realLimit)
		var rates []string
		for i, s := range samples {
			if i%50 == 0 { // every half second
				rates = append(rates, fmt.Sprintf("%.0f", s.rate))
			}
		}
		firstAt := "none"
		if !firstLimited.IsZero() {
			firstAt = firstLimited.Sub(first).Round(time.Millisecond).String() + " after the first call"
		}
		b.Logf("real limit %d/s, workers at %d/s, %d sends: %d calls, %d 429s (%.2f%%), %d in the first 2 s, %.2f%% after the first 10 s; first 429: %s, rate ≤ real %.3f s after it; utilisation %.3f from 1 s after it; learned ceiling %.1f/s",
			realLimit, configured, n, total, last.limited, 100*runShare, at2s.limited, 100*lateShare,
			firstAt, runConverge, runUtil, last.ceiling)
		b.Logf("shared rate every 0.5 s: %s", strings.Join(rates, " "))
		var changes []string
		for i, s := range samples {
			if i > 0 && (s.rate != samples[i-1].rate || s.measuring != samples[i-1].measuring) && len(changes) < 12 {
				m := ""
				if s.measuring {
					m = " measuring"
				}
				changes = append(changes, fmt.Sprintf("%.2fs %.1f/s%s (429s %d)", s.at.Sub(first).Seconds(), s.rate, m, s.limited))
			}
		}
		b.Logf("shared rate changes from the first call: %s", strings.Join(changes, ", "))
		if !firstLimited.IsZero() {
			// Where the 429s fell: in each 100 ms from the first one.
			var per []string
			prev, next := int64(0), firstLimited
			for _, s := range samples {
				if s.at.After(firstLimited.Add(2 * time.Second)) {
					break
				}
				if !s.at.Before(next) {
					per = append(per, strconv.FormatInt(s.limited-prev, 10))
					prev, next = s.limited, next.Add(100*time.Millisecond)
				}
			}
			b.Logf("429s by 100 ms from the first: %s", strings.Join(per, " "))
		}
		if int64(blind+seen) != last.limited {
			b.Errorf("the workers logged %d 429s, the sandbox answered %d: the split below is not to be trusted", blind+seen, last.limited)
		}
		if blind+seen > 0 {
			b.Logf("429s of calls started before any worker had a 429 answer: %d; after: %d (%.2f%% of calls); call latency around the first answer: median %s",
				blind, seen, 100*float64(seen)/float64(total), lat)
		}
		unseen += float64(blind)
		avoidable += float64(seen) / float64(total)
		share += runShare
		early += float64(at2s.limited)
		converge += runConverge
		late += lateShare
		util += runUtil
		b.StartTimer()
	}
	N := float64(b.N)
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(share/N, "429-share")
	b.ReportMetric(early/N, "429s-2s")
	b.ReportMetric(converge/N, "converge-s")
	b.ReportMetric(late/N, "429s-after-10s")
	b.ReportMetric(util/N, "utilisation")
	b.ReportMetric(unseen/N, "429s-blind")
	b.ReportMetric(avoidable/N, "429-share-seen")
}

// buildWorkerAt builds ./cmd/worker as it was at a git revision, from a
// copy of that tree, for a baseline measured in the same run.
func buildWorkerAt(b *testing.B, rev string) string {
	b.Helper()
	src := filepath.Join(b.TempDir(), "src")
	if err := os.MkdirAll(src, 0o755); err != nil {
		b.Fatal(err)
	}
	archive := exec.Command("sh", "-c", "git -C \"$(git rev-parse --show-toplevel)\" archive --format=tar \"$REV\" | tar -x -C \"$DST\"")
	archive.Env = append(os.Environ(), "REV="+rev, "DST="+src)
	if out, err := archive.CombinedOutput(); err != nil {
		b.Fatalf("git archive %s: %v\n%s", rev, err, out)
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	out := filepath.Join(b.TempDir(), "worker-"+strings.NewReplacer("/", "_").Replace(rev))
	build := exec.Command(goBin, "build", "-o", out, "./cmd/worker")
	build.Dir = src
	if msg, err := build.CombinedOutput(); err != nil {
		b.Fatalf("building the worker at %s: %v\n%s", rev, err, msg)
	}
	return out
}

// workerCall is one WeChat call as a worker logged it: when it started
// (before signing) and ended, and whether WeChat answered 429.
type workerCall struct {
	start, end time.Time
	limited    bool
}

type workerCalls []workerCall

// readCalls reads the calls from the fleet's JSON logs (the "sent" and
// "will retry" lines, which carry latency_ms).
func readCalls(b *testing.B, fleet []*fleetWorker) workerCalls {
	b.Helper()
	var out workerCalls
	for _, w := range fleet {
		f, err := os.Open(w.logPath)
		if err != nil {
			b.Fatal(err)
		}
		dec := json.NewDecoder(f)
		for {
			var l struct {
				Time    time.Time `json:"time"`
				Outcome string    `json:"outcome"`
				Latency *int64    `json:"latency_ms"`
			}
			if err := dec.Decode(&l); errors.Is(err, io.EOF) {
				break
			} else if err != nil {
				b.Fatalf("%s: not a JSON log line: %v", w.logPath, err)
			}
			if l.Latency == nil || l.Outcome == "" {
				continue
			}
			out = append(out, workerCall{start: l.Time.Add(-time.Duration(*l.Latency) * time.Millisecond), end: l.Time, limited: l.Outcome == "rate_limited"})
		}
		f.Close()
	}
	return out
}

// split counts the 429s of calls started before the first 429 answer
// reached any worker (no limiter could have held them back: nobody knew)
// and after it, and the median latency of the calls that ended within
// 100 ms of that first answer.
func (cs workerCalls) split() (blind, seen int, latency time.Duration) {
	var first time.Time
	for _, c := range cs {
		if c.limited && (first.IsZero() || c.end.Before(first)) {
			first = c.end
		}
	}
	if first.IsZero() {
		return 0, 0, 0
	}
	var lat []time.Duration
	for _, c := range cs {
		if c.limited && c.start.Before(first) {
			blind++
		} else if c.limited {
			seen++
		}
		if d := c.end.Sub(first); d > -100*time.Millisecond && d < 100*time.Millisecond {
			lat = append(lat, c.end.Sub(c.start))
		}
	}
	slices.Sort(lat)
	return blind, seen, lat[len(lat)/2]
}
