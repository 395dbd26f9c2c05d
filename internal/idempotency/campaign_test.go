package idempotency

import (
	"context"
	"strings"
	"testing"
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
