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
	Concurrency int // enqueues in flight at once, default 32
	KeepInvalid int // invalid rows kept for the summary, default 20
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
	if opts.KeepInvalid <= 0 {
		opts.KeepInvalid = 20
	}
	stats.keepRows = opts.KeepInvalid
	if c.StockCreatorMchID == "" {
		c.StockCreatorMchID = c.MchID
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)

	rows := make(chan campaign.Row, opts.Concurrency*4)
	var wg sync.WaitGroup
	for i := 0; i < opts.Concurrency; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for row := range rows {
				if ctx.Err() != nil {
					continue // drain
				}
				res, err := p.Enqueue(ctx, c.args(row))
				var inv *InvalidError
				switch {
				case errors.As(err, &inv):
					stats.addInvalid(fmt.Sprintf("line %d: %v", row.Line, err))
				case err != nil:
					cancel(fmt.Errorf("line %d: %w", row.Line, err))
				case res.Outcome == Duplicate:
					stats.Duplicates.Add(1)
				default:
					stats.Enqueued.Add(1)
				}
			}
		}()
	}

	var fileErr error
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
		select {
		case rows <- row:
		case <-ctx.Done():
		}
	}
	close(rows)
	wg.Wait()
	if cause := context.Cause(ctx); cause != nil && !errors.Is(cause, context.Canceled) {
		return fmt.Errorf("redis failed at %w; run the same command again to resume: rows already queued will count as duplicates", cause)
	}
	if fileErr != nil {
		return fileErr
	}
	return ctx.Err()
}

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
