package idempotency

import (
	"context"
	"testing"
	"time"
)

// The start of a campaign is kept from its first run, "at once" included,
// and read back with the campaign.
func TestSetStartAtKeepsTheFirst(t *testing.T) {
	s, ctx := newStore(t), context.Background()
	at := time.Now().Add(time.Hour).Truncate(time.Millisecond)
	if _, err := s.SaveCampaign(ctx, Campaign{Name: "later", MchID: "1900000001", Deadline: at.Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	if got, err := s.SetStartAt(ctx, "later", at); err != nil || !got.Equal(at) {
		t.Fatalf("SetStartAt: %s, %v; want %s", got, err, at)
	}
	if got, err := s.SetStartAt(ctx, "later", at.Add(time.Hour)); err != nil || !got.Equal(at) {
		t.Fatalf("a second SetStartAt: %s, %v; want the first, %s", got, err, at)
	}
	if c, err := s.Campaign(ctx, "later"); err != nil || !c.StartAt.Equal(at) {
		t.Fatalf("Campaign: StartAt %s, %v; want %s", c.StartAt, err, at)
	}
	if got, err := s.SetStartAt(ctx, "now", time.Time{}); err != nil || !got.IsZero() {
		t.Fatalf("at once: %s, %v", got, err)
	}
	if got, err := s.SetStartAt(ctx, "now", at); err != nil || !got.IsZero() {
		t.Fatalf("a start given to a campaign first run at once: %s, %v; want it kept at once", got, err)
	}
}
