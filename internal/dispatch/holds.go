package dispatch

import (
	"cmp"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/couponflow/dispatcher/internal/idempotency"
)

// holdLog sums up the sends held before a call, so that an operator sees
// at info level that a stock is dry or a user busy, without a line for
// each of thousands of holds: one line per reason, campaign and stock per
// interval, written by the first hold after the interval ends.
type holdLog struct {
	every time.Duration
	log   *slog.Logger

	mu     sync.Mutex
	since  time.Time
	counts map[holdKey]int
}

type holdKey struct{ reason, campaign, stockID string }

func (h *Handler) held(reason string, send idempotency.Send) {
	h.metrics.Held(reason)
	h.holds.add(holdKey{reason, send.Campaign, send.StockID}, h.now())
}

func (l *holdLog) add(k holdKey, now time.Time) {
	l.mu.Lock()
	if l.counts == nil {
		l.counts, l.since = map[holdKey]int{}, now
	}
	l.counts[k]++
	var flush map[holdKey]int
	since := l.since
	if now.Sub(l.since) >= l.every {
		flush, l.counts = l.counts, nil
	}
	l.mu.Unlock()
	keys := make([]holdKey, 0, len(flush))
	for k := range flush {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b holdKey) int {
		return cmp.Or(cmp.Compare(a.reason, b.reason), cmp.Compare(a.campaign, b.campaign), cmp.Compare(a.stockID, b.stockID))
	})
	for _, k := range keys {
		l.log.Info("sends held before calling WeChat", "reason", k.reason, "campaign", k.campaign, "stock_id", k.stockID,
			"holds", flush[k], "over_s", int(now.Sub(since).Seconds()))
	}
}
