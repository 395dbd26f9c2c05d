package main

import (
	"strings"
	"testing"
	"time"

	"github.com/couponflow/dispatcher/internal/wechat"
)

func TestParseStartAt(t *testing.T) {
	for _, c := range []struct {
		in   string
		want time.Time
	}{
		{"", time.Time{}},
		{"2026-05-01T10:00:00+08:00", time.Date(2026, 5, 1, 2, 0, 0, 0, time.UTC)},
		{"2026-05-01 10:00", time.Date(2026, 5, 1, 10, 0, 0, 0, time.Local)},
		{"2026-05-01 10:00:30", time.Date(2026, 5, 1, 10, 0, 30, 0, time.Local)},
	} {
		got, err := parseStartAt(c.in)
		if err != nil || !got.Equal(c.want) {
			t.Errorf("parseStartAt(%q) = %s, %v; want %s", c.in, got, err, c.want)
		}
	}
	_, err := parseStartAt("tomorrow 10am")
	if err == nil || !strings.Contains(err.Error(), "RFC 3339") || !strings.Contains(err.Error(), "2006-01-02 15:04") || !strings.Contains(err.Error(), `"tomorrow 10am"`) {
		t.Errorf("a bad --start-at: %v", err)
	}
}

func TestChooseDeadline(t *testing.T) {
	end := time.Now().Add(10 * 24 * time.Hour).Truncate(time.Second)
	known := stockQuery{info: &wechat.StockInfo{AvailableEnd: end}}
	if dl, from, err := chooseDeadline(false, "", known, time.Time{}); err != nil || from != "stock" || !dl.Equal(end) {
		t.Errorf("a known end: %s %s %v", dl, from, err)
	}
	start := time.Now().Add(time.Hour)
	if dl, from, err := chooseDeadline(false, "", stockQuery{}, start); err != nil || from != "default" || !dl.Equal(start.Add(72*time.Hour)) {
		t.Errorf("an unknown end: %s %s %v", dl, from, err)
	}
	if _, from, err := chooseDeadline(true, "2h", known, time.Time{}); err != nil || from != "flag" {
		t.Errorf("--deadline 2h: %s %v", from, err)
	}
	if _, _, err := chooseDeadline(true, "30m", known, start); err == nil || !strings.Contains(err.Error(), "--start-at") {
		t.Errorf("a deadline before the start: %v", err)
	}
}
