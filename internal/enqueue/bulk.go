package enqueue

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/couponflow/dispatcher/internal/campaign"
	"github.com/couponflow/dispatcher/internal/tasks"
)

// Campaign is what every row of a campaign file shares.
type Campaign struct {
	Name              string
	MchID             string
	AppID             string
	StockID           string
	StockCreatorMchID string
	Deadline          time.Time
}

// Stats are a bulk run's counters, safe to read while it runs.
type Stats struct {
	Lines      atomic.Int64 // lines read from the file
	Bytes      atomic.Int64 // bytes read from the file
	Enqueued   atomic.Int64
	Duplicates atomic.Int64
	Invalid    atomic.Int64

	mu       sync.Mutex
	invalid  []string // the first few invalid rows, for the summary
	keepRows int
}

// InvalidRows returns the first invalid rows' messages, in file order.
func (s *Stats) InvalidRows() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.invalid...)
}

func (s *Stats) addInvalid(msg string) {
	s.Invalid.Add(1)
	s.mu.Lock()
	if len(s.invalid) < s.keepRows {
		s.invalid = append(s.invalid, msg)
	}
	s.mu.Unlock()
}

// BulkOptions tune Bulk.
type BulkOptions struct {
	Concurrency int // batches in flight at once, default 32
	// Batch is the rows recorded and queued together, in two round trips
	// (Producer.EnqueueBatch); default 64.
	Batch       int
	KeepInvalid int // invalid rows kept for the summary, default 20
	// Ack, when set, makes the rows written so far durable (a replica
	// holds them: redisconn.Acknowledger); Bulk counts a row as enqueued
	// or duplicate only once a call of Ack that began after the row's
	// writes completed has returned nil. Nil: rows count at once.
	Ack Acknowledger
	// AckInterval is how often the rows written since the last Ack are
	// acknowledged, as one batch, while writing goes on; default 20ms.
	AckInterval time.Duration
}

// An Acknowledger returns nil once every write completed before the call
// is kept by the deployment (held by a replica).
type Acknowledger interface {
	Acknowledge(ctx context.Context) error
}

// AckError is Bulk's error when rows were written but not acknowledged.
type AckError struct {
	Rows int64 // rows written whose acknowledgement failed
	Err  error
}

func (e *AckError) Error() string {
	return fmt.Sprintf("%v: the last %d rows written, and any after them, are not counted as queued; run the same command again: rows already queued will count as duplicates", e.Err, e.Rows)
}
func (e *AckError) Unwrap() error { return e.Err }

// acked counts rows into stats as their batches are acknowledged.
type acked struct {
	ack            Acknowledger
	stats          *Stats
	mu             sync.Mutex
	enqueued, dups int64 // written, not yet acknowledged
}

func (a *acked) add(dup bool) {
	if a.ack == nil {
		if dup {
			a.stats.Duplicates.Add(1)
		} else {
			a.stats.Enqueued.Add(1)
		}
		return
	}
	a.mu.Lock()
	if dup {
		a.dups++
	} else {
		a.enqueued++
	}
	a.mu.Unlock()
}

// flush acknowledges every row counted so far: their writes completed
// before this call, so before Acknowledge's own.
func (a *acked) flush(ctx context.Context) error {
	if a.ack == nil {
		return nil
	}
	a.mu.Lock()
	enq, dups := a.enqueued, a.dups
	a.enqueued, a.dups = 0, 0
	a.mu.Unlock()
	if enq+dups == 0 {
		return nil
	}
	if err := a.ack.Acknowledge(ctx); err != nil {
		return &AckError{Rows: enq + dups, Err: err}
	}
	a.stats.Enqueued.Add(enq)
	a.stats.Duplicates.Add(dups)
	return nil
}

// Bulk enqueues every valid row of r, concurrently, counting into stats.
// Invalid rows are counted and skipped. It returns a file error (the file
// is not a recipients file: nothing of it was enqueued if it failed at the
// start) or a Redis error (stop; the same run again resumes, every row
// already queued being reported as a duplicate).
func (p *Producer) Bulk(ctx context.Context, r *campaign.Reader, c Campaign, stats *Stats, opts BulkOptions) error {
	if opts.Concurrency <= 0 {
		opts.Concurrency = 32
	}
	if opts.Batch <= 0 {
		opts.Batch = 64
	}
	if opts.KeepInvalid <= 0 {
		opts.KeepInvalid = 20
	}
	stats.keepRows = opts.KeepInvalid
	if c.StockCreatorMchID == "" {
		c.StockCreatorMchID = c.MchID
	}
	if opts.AckInterval <= 0 {
		opts.AckInterval = 20 * time.Millisecond
	}
	parent := ctx
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	counts := &acked{ack: opts.Ack, stats: stats}
	stopAcks, acksDone := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(acksDone)
		if opts.Ack == nil {
			return
		}
		t := time.NewTicker(opts.AckInterval)
		defer t.Stop()
		for {
			select {
			case <-stopAcks:
				return
			case <-ctx.Done():
				return
			case <-t.C:
			}
			if err := counts.flush(ctx); err != nil {
				cancel(err)
				return
			}
		}
	}()

	batches := make(chan []campaign.Row, opts.Concurrency)
	var wg sync.WaitGroup
	for i := 0; i < opts.Concurrency; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			args := make([]tasks.Args, 0, opts.Batch)
			for rows := range batches {
				if ctx.Err() != nil {
					continue // drain
				}
				args = args[:0]
				for _, row := range rows {
					args = append(args, c.args(row))
				}
				res, err := p.EnqueueBatch(ctx, args)
				if err != nil {
					cancel(fmt.Errorf("lines %d to %d: %w", rows[0].Line, rows[len(rows)-1].Line, err))
					continue
				}
				for j, r := range res {
					if r.Err != nil {
						stats.addInvalid(fmt.Sprintf("line %d: %v", rows[j].Line, r.Err))
						continue
					}
					counts.add(r.Outcome == Duplicate)
				}
			}
		}()
	}

	var fileErr error
	batch := make([]campaign.Row, 0, opts.Batch)
	send := func() {
		if len(batch) == 0 {
			return
		}
		select {
		case batches <- batch:
		case <-ctx.Done():
		}
		batch = make([]campaign.Row, 0, opts.Batch)
	}
	for ctx.Err() == nil {
		row, err := r.Next()
		stats.Lines.Store(int64(r.Line()))
		stats.Bytes.Store(r.BytesRead())
		var rowErr *campaign.RowError
		if errors.As(err, &rowErr) {
			stats.addInvalid(rowErr.Error())
			continue
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			fileErr = err
			break
		}
		batch = append(batch, row)
		if len(batch) == opts.Batch {
			send()
		}
	}
	// The rows read before a file error are valid: queue them too.
	if ctx.Err() == nil {
		send()
	}
	close(batches)
	wg.Wait()
	close(stopAcks)
	<-acksDone
	// The last batch, also after a Redis failure: rows written before it
	// count once acknowledged.
	var ackErr *AckError
	cause := context.Cause(ctx)
	if errors.As(cause, &ackErr) {
		return cause
	}
	if err := counts.flush(context.WithoutCancel(parent)); err != nil && (cause == nil || errors.Is(cause, context.Canceled)) {
		return err
	}
	if cause != nil && !errors.Is(cause, context.Canceled) {
		return fmt.Errorf("redis failed at %w; run the same command again to resume: rows already queued will count as duplicates", cause)
	}
	if fileErr != nil {
		return fileErr
	}
	return ctx.Err()
}

// Send is the send Bulk would queue for row: a dry run validates and
// counts the very same.
func (c Campaign) Send(row campaign.Row) tasks.SendCoupon { return c.args(row) }

func (c Campaign) args(row campaign.Row) tasks.SendCoupon {
	orn := row.OutRequestNo
	if orn == "" {
		orn = tasks.DeriveOutRequestNo(c.MchID, c.Name, row.OpenID)
	}
	return tasks.SendCoupon{
		Common: tasks.Common{
			V: tasks.Version, Campaign: c.Name, MchID: c.MchID, OpenID: row.OpenID, StockID: c.StockID,
			OutRequestNo: orn, AppID: c.AppID, Deadline: c.Deadline,
		},
		StockCreatorMchID: c.StockCreatorMchID,
		CouponValue:       row.CouponValue,
		CouponMinimum:     row.CouponMinimum,
	}
}
