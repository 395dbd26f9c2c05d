package idempotency

import (
	"context"
	"fmt"
	"strconv"
	"time"
)

// SetStartAt records when a campaign's sends are processed from (zero: at
// once) the first time it is given, and returns the time kept. Like the
// deadline, it does not move on a re-run: the sends queued by the first
// run are already scheduled for it.
func (s *Store) SetStartAt(ctx context.Context, campaign string, at time.Time) (time.Time, error) {
	var ms int64
	if !at.IsZero() {
		ms = at.UnixMilli()
	}
	key := s.metaKey(campaign)
	if err := s.rdb.HSetNX(ctx, key, "start_at", strconv.FormatInt(ms, 10)).Err(); err != nil {
		return time.Time{}, fmt.Errorf("idempotency: recording the start of campaign %s: %w", campaign, err)
	}
	v, err := s.rdb.HGet(ctx, key, "start_at").Result()
	if err != nil {
		return time.Time{}, fmt.Errorf("idempotency: reading the start of campaign %s: %w", campaign, err)
	}
	return millis(v), nil
}
