package idempotency

import (
	"context"
	"strings"
	"testing"
	"time"
)

func loseRecord(t *testing.T, s *Store, send Send) {
	t.Helper()
	if ok, err := s.LoseForDrill(context.Background(), send); err != nil || !ok {
		t.Fatalf("LoseForDrill: %v, %v", ok, err)
	}
}

// The expected count is the registered total at the end of an enqueue,
// never lowered; Status reports the records missing below it.
func TestExpectedAndMissing(t *testing.T) {
	s, ctx := newStore(t), context.Background()
	st := wantCounts(t, s, nil)
	if st.Expected != 0 || st.Missing() != 0 {
		t.Fatalf("before any enqueue: expected %d, missing %d", st.Expected, st.Missing())
	}
	for i := range 5 {
		if _, _, err := s.Register(ctx, send(i)); err != nil {
			t.Fatal(err)
		}
	}
	if n, err := s.RecordExpected(ctx, "c1"); err != nil || n != 5 {
		t.Fatalf("RecordExpected: %d, %v; want 5", n, err)
	}
	loseRecord(t, s, send(3))
	loseRecord(t, s, send(4))
	// A later run that stopped early, or a status read: the count stays.
	if n, err := s.RecordExpected(ctx, "c1"); err != nil || n != 5 {
		t.Fatalf("RecordExpected after a loss: %d, %v; want 5 kept", n, err)
	}
	st = wantCounts(t, s, map[State]int64{Pending: 3})
	if st.Expected != 5 || st.Missing() != 2 {
		t.Fatalf("expected %d, missing %d; want 5 and 2", st.Expected, st.Missing())
	}
	if adv := st.MissingAdvice(); !strings.HasPrefix(adv, "2 records missing (Redis lost writes); run the same enqueuer campaign command again") {
		t.Errorf("advice: %q", adv)
	}
	// Running the enqueue again registers them again.
	for i := range 6 {
		s.Register(ctx, send(i))
	}
	if n, err := s.RecordExpected(ctx, "c1"); err != nil || n != 6 {
		t.Fatalf("RecordExpected after the re-run with one more row: %d, %v; want 6", n, err)
	}
	st = wantCounts(t, s, map[State]int64{Pending: 6})
	if st.Missing() != 0 {
		t.Fatalf("missing %d after the re-run", st.Missing())
	}
}

// The rows a run skipped are kept (a few, cut short) for the monitor; a
// later run's count replaces the earlier one.
func TestRecordSkipped(t *testing.T) {
	st := newStore(t)
	ctx := context.Background()
	if _, err := st.SaveCampaign(ctx, Campaign{Name: "spring", MchID: "1900", Deadline: time.Now().Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	long := "line 9: openid \"" + strings.Repeat("x", 400) + "\" is too long"
	rows := []string{"line 2: openid \"a b\" has a character outside letters", "line 3: two\nlines", long, "line 4", "line 5", "line 6"}
	if err := st.RecordSkipped(ctx, "spring", 6, rows); err != nil {
		t.Fatal(err)
	}
	c, err := st.Campaign(ctx, "spring")
	if err != nil {
		t.Fatal(err)
	}
	if c.Skipped != 6 || len(c.SkippedRows) != MaxSkippedRows || c.SkippedRows[0] != rows[0] || c.SkippedRows[1] != "line 3: two lines" ||
		len(c.SkippedRows[2]) > maxSkippedRow+len("…") || !strings.HasPrefix(c.SkippedRows[2], "line 9") {
		t.Fatalf("skipped %d, rows %q", c.Skipped, c.SkippedRows)
	}
	if err := st.RecordSkipped(ctx, "spring", 0, nil); err != nil {
		t.Fatal(err)
	}
	if c, _ = st.Campaign(ctx, "spring"); c.Skipped != 0 || c.SkippedRows != nil {
		t.Fatalf("after a clean run: skipped %d, rows %q", c.Skipped, c.SkippedRows)
	}
}
