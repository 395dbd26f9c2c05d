package enqueue

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hibiken/asynq"

	"github.com/couponflow/dispatcher/internal/campaign"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/redistest"
)

// fakeAck checks, at each call, that every row Bulk has counted so far is
// written, and fails from call failFrom on (0: never).
type fakeAck struct {
	t        *testing.T
	store    *idempotency.Store
	stats    *Stats
	calls    atomic.Int32
	failFrom int32
}

func (a *fakeAck) Acknowledge(ctx context.Context) error {
	n := a.calls.Add(1)
	st, err := a.store.Status(ctx, "bulk")
	if err != nil {
		return err
	}
	if counted := a.stats.Enqueued.Load() + a.stats.Duplicates.Load(); counted > st.Total {
		a.t.Errorf("%d rows counted before they were acknowledged: %d written", counted, st.Total)
	}
	time.Sleep(5 * time.Millisecond) // a replica's round trip
	if a.failFrom > 0 && n >= a.failFrom {
		return errors.New("writes not acknowledged by a replica within 5s")
	}
	return nil
}

func bulkRig(t *testing.T, rows int) (*Producer, *idempotency.Store, *campaign.Reader) {
	t.Helper()
	rdb := redistest.Start(t).Client()
	store := idempotency.New(rdb)
	var b strings.Builder
	b.WriteString("openid\n")
	for i := range rows {
		fmt.Fprintf(&b, "o_%05d\n", i)
	}
	b.WriteString("o_00000\n") // a duplicate
	r, err := campaign.NewReader(strings.NewReader(b.String()), campaign.Options{Format: "csv"})
	if err != nil {
		t.Fatal(err)
	}
	return New(asynq.NewClientFromRedisClient(rdb), store), store, r
}

var bulkCampaign = Campaign{Name: "bulk", MchID: "1900000001", AppID: "wx0001", StockID: "16000001", Deadline: time.Now().Add(time.Hour)}

// Rows count only once a batch that began after their writes is
// acknowledged; every row ends counted.
func TestBulkCountsAcknowledgedRows(t *testing.T) {
	t.Parallel()
	p, store, r := bulkRig(t, 2000)
	var stats Stats
	ack := &fakeAck{t: t, store: store, stats: &stats}
	err := p.Bulk(context.Background(), r, bulkCampaign, &stats, BulkOptions{Ack: ack, AckInterval: 2 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if stats.Enqueued.Load() != 2000 || stats.Duplicates.Load() != 1 {
		t.Fatalf("enqueued %d, duplicates %d; want 2000 and 1", stats.Enqueued.Load(), stats.Duplicates.Load())
	}
	if ack.calls.Load() < 2 {
		t.Errorf("%d acknowledgements, want several batches", ack.calls.Load())
	}
	t.Logf("%d batches acknowledged", ack.calls.Load())
}

// A batch that is not acknowledged stops the run: its rows are not
// counted, and the error says to run the command again.
func TestBulkStopsWhenNotAcknowledged(t *testing.T) {
	t.Parallel()
	// Enough rows that the run is still writing at the third call.
	p, store, r := bulkRig(t, 50000)
	var stats Stats
	ack := &fakeAck{t: t, store: store, stats: &stats, failFrom: 3}
	err := p.Bulk(context.Background(), r, bulkCampaign, &stats, BulkOptions{Ack: ack, AckInterval: 2 * time.Millisecond})
	var ackErr *AckError
	if !errors.As(err, &ackErr) {
		t.Fatalf("Bulk: %v, want an *AckError", err)
	}
	if !strings.Contains(err.Error(), "not acknowledged by a replica") || !strings.Contains(err.Error(), "run the same command again") {
		t.Errorf("error: %v", err)
	}
	st, serr := store.Status(context.Background(), "bulk")
	if serr != nil {
		t.Fatal(serr)
	}
	counted := stats.Enqueued.Load() + stats.Duplicates.Load()
	if counted+ackErr.Rows > st.Total+1 || counted >= st.Total {
		t.Errorf("counted %d, unacknowledged %d, written %d", counted, ackErr.Rows, st.Total)
	}
	t.Logf("%v; %d counted, %d written", err, counted, st.Total)
}
