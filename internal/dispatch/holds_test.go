package dispatch

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
	"time"
)

// Thousands of holds make one line per reason, campaign and stock per
// interval, never one per hold.
func TestHoldsAreSummedUpPerInterval(t *testing.T) {
	var buf bytes.Buffer
	l := &holdLog{every: 10 * time.Second, log: slog.New(slog.NewTextHandler(&buf, nil))}
	for i := 0; i < 1000; i++ {
		l.add(holdKey{"budget_breaker", "spring", "16000001"}, t0.Add(time.Duration(i)*time.Millisecond))
		l.add(holdKey{"busy", "spring", "16000001"}, t0.Add(time.Duration(i)*time.Millisecond))
	}
	if buf.Len() != 0 {
		t.Fatalf("logged within the interval:\n%s", buf.String())
	}
	l.add(holdKey{"budget_breaker", "autumn", "16000002"}, t0.Add(11*time.Second))
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 3 {
		t.Fatalf("%d lines, want one per reason, campaign and stock:\n%s", len(lines), buf.String())
	}
	for i, want := range []string{
		"reason=budget_breaker campaign=autumn stock_id=16000002 holds=1 over_s=11",
		"reason=budget_breaker campaign=spring stock_id=16000001 holds=1000 over_s=11",
		"reason=busy campaign=spring stock_id=16000001 holds=1000 over_s=11",
	} {
		if !strings.Contains(lines[i], "level=INFO") || !strings.Contains(lines[i], want) {
			t.Errorf("line %d: %s\nwant %s", i, lines[i], want)
		}
	}
	buf.Reset()
	l.add(holdKey{"busy", "spring", "16000001"}, t0.Add(12*time.Second))
	if buf.Len() != 0 {
		t.Fatalf("a new interval logged at once:\n%s", buf.String())
	}
}
