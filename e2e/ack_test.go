package e2e

import (
	"context"
	"errors"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/redistest"
	"github.com/couponflow/dispatcher/internal/tasks"
)

// Acknowledged means kept: a Sentinel deployment whose replica lags (it is
// paused 200ms of every 220ms), a campaign of 3,000 rows, and the master
// SIGKILLed the moment the enqueuer exits 0. Every row it counted as
// enqueued has its record and its task on the promoted replica.
//
// The same with --replica-timeout 0 (no WAIT: how the enqueuer behaved
// before) measures what is lost without it, and that running the same
// command again restores it.
func TestAcknowledgedMeansKept(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"wait", nil},
		{"nowait", []string{"--replica-timeout", "0"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			const n = 3000
			s := redistest.StartSentinelWith(t, redistest.SentinelOptions{ReplicationDelay: 200 * time.Millisecond})
			r := openURL(t, s.URL())
			path, openids := r.writeUsers(tc.name, n)
			campaign := "ack-" + tc.name
			args := append([]string{"campaign", "--file", path, "--stock-id", r.stockID(), "--campaign", campaign}, tc.args...)

			start := time.Now()
			out, code := r.enqueuer(args...)
			behind := replicaBehind(t, s.MasterAddr())
			old := s.KillMaster()
			if code != 0 {
				t.Fatalf("enqueuer exited %d:\n%s", code, out)
			}
			t.Logf("enqueuer took %s, the replica had not acknowledged %d bytes when the master was killed:\n%s",
				time.Since(start).Round(time.Millisecond), behind, strings.TrimSpace(out))
			enqueued := summaryCount(t, out, "enqueued")
			if enqueued != n {
				t.Fatalf("enqueued %d, want %d", enqueued, n)
			}
			if tc.args == nil && !strings.Contains(out, "acknowledged by 1 replica(s)") {
				t.Errorf("the summary does not say a replica acknowledged the rows:\n%s", out)
			}
			now := s.WaitForNewMaster(old, 30*time.Second)
			t.Logf("master %s killed, %s promoted", old, now)

			master := redis.NewClient(&redis.Options{Addr: now})
			defer master.Close()
			lost := lostRows(t, master, r.sb.Env()["WECHATPAY_MCHID"], campaign, openids)
			t.Logf("%s: %d of %d rows reported enqueued are lost (no record, or no task)", tc.name, lost, n)
			if tc.args == nil {
				if lost != 0 {
					t.Fatalf("%d acknowledged rows lost", lost)
				}
				return
			}
			// Without WAIT the count the run recorded at its end was in the
			// lost tail too: status cannot tell.
			st, err := idempotency.New(master).Status(context.Background(), campaign)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("status on the new master: total %d, expected %d, missing %d", st.Total, st.Expected, st.Missing())
			// The same command again restores what was lost.
			out, code = r.enqueuer(args...)
			if code != 0 {
				t.Fatalf("re-run exited %d:\n%s", code, out)
			}
			if got := summaryCount(t, out, "enqueued"); got != lost {
				t.Errorf("re-run enqueued %d, want the %d lost", got, lost)
			}
			if lost := lostRows(t, master, r.sb.Env()["WECHATPAY_MCHID"], campaign, openids); lost != 0 {
				t.Fatalf("%d rows still lost after the re-run", lost)
			}
		})
	}
}

// summaryCount reads "<what> N" from the enqueuer's summary line.
func summaryCount(t *testing.T, out, what string) int {
	t.Helper()
	m := regexp.MustCompile(`: ` + what + ` (\d+),`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no %q count in:\n%s", what, out)
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

// lostRows counts the recipients of campaign without a record or without
// a pending task on the server rdb.
func lostRows(t *testing.T, rdb *redis.Client, mchID, campaign string, openids []string) int {
	t.Helper()
	ctx := context.Background()
	store := idempotency.New(rdb)
	insp := asynq.NewInspectorFromRedisClient(rdb)
	lost := 0
	for _, id := range openids {
		orn := tasks.DeriveOutRequestNo(mchID, campaign, id)
		rec, err := store.Get(ctx, idempotency.Send{MchID: mchID, OutRequestNo: orn, Campaign: campaign})
		if err != nil {
			t.Fatal(err)
		}
		key := tasks.Key{MchID: mchID, OutRequestNo: orn}
		_, err = insp.GetTaskInfo(tasks.DefaultQueue, key.TaskID())
		switch {
		case errors.Is(err, asynq.ErrTaskNotFound), errors.Is(err, asynq.ErrQueueNotFound):
			lost++
		case err != nil:
			t.Fatal(err)
		case rec.State != idempotency.Pending:
			lost++
		}
	}
	return lost
}

// replicaBehind is how many bytes of the replication stream the master's
// first replica had not acknowledged.
func replicaBehind(t *testing.T, addr string) int64 {
	t.Helper()
	c := redis.NewClient(&redis.Options{Addr: addr})
	defer c.Close()
	info, err := c.Info(context.Background(), "replication").Result()
	if err != nil {
		t.Fatal(err)
	}
	var master, replica int64
	for _, line := range strings.Split(info, "\r\n") {
		if v, ok := strings.CutPrefix(line, "master_repl_offset:"); ok {
			master, _ = strconv.ParseInt(v, 10, 64)
		}
		if v, ok := strings.CutPrefix(line, "slave0:"); ok {
			for _, kv := range strings.Split(v, ",") {
				if o, ok := strings.CutPrefix(kv, "offset="); ok {
					replica, _ = strconv.ParseInt(o, 10, 64)
				}
			}
		}
	}
	return master - replica
}

// Records lost after a complete enqueue (here removed as a lost write
// would leave them): status says how many and what to do, and the same
// command again restores them.
func TestStatusSaysRecordsMissing(t *testing.T) {
	t.Parallel()
	r := newRig(t)
	path, openids := r.writeUsers("lossy", 50)
	args := []string{"campaign", "--file", path, "--stock-id", r.stockID(), "--campaign", "lossy"}
	if out, code := r.enqueuer(args...); code != 0 {
		t.Fatal(out)
	}
	if out, _ := r.enqueuer("status", "--campaign", "lossy"); strings.Contains(out, "missing") {
		t.Fatalf("status warns with nothing missing:\n%s", out)
	}
	ctx := context.Background()
	mchID := r.sb.Env()["WECHATPAY_MCHID"]
	insp := asynq.NewInspectorFromRedisClient(r.rdb)
	for _, id := range openids[10:13] {
		orn := tasks.DeriveOutRequestNo(mchID, "lossy", id)
		if ok, err := r.store.LoseForDrill(ctx, idempotency.Send{MchID: mchID, OutRequestNo: orn, Campaign: "lossy"}); err != nil || !ok {
			t.Fatal(ok, err)
		}
		if err := insp.DeleteTask(tasks.DefaultQueue, tasks.Key{MchID: mchID, OutRequestNo: orn}.TaskID()); err != nil {
			t.Fatal(err)
		}
	}
	out, code := r.enqueuer("status", "--campaign", "lossy")
	if code != 0 || !strings.Contains(out, "3 records missing (Redis lost writes); run the same enqueuer campaign command again to restore them") {
		t.Fatalf("status after losing 3 records, exit %d:\n%s", code, out)
	}
	t.Logf("status:\n%s", out)
	out, _ = r.enqueuer("status", "--campaign", "lossy", "--json")
	if !strings.Contains(out, `"missing":3`) || !strings.Contains(out, `"expected":50`) {
		t.Errorf("status --json:\n%s", out)
	}
	out, code = r.enqueuer(args...)
	if code != 0 || !strings.Contains(out, "enqueued 3, duplicates 47") {
		t.Fatalf("re-run, exit %d:\n%s", code, out)
	}
	if out, _ := r.enqueuer("status", "--campaign", "lossy"); strings.Contains(out, "missing") {
		t.Fatalf("status still warns after the re-run:\n%s", out)
	}
}
