package monitor

import (
	"testing"
	"time"
)

// A form's token is good for tokenTTL, for the user, campaign and action
// it was made for, and only under the key of the process that made it.
func TestActionToken(t *testing.T) {
	s, other := &Server{}, &Server{}
	s.tokenKey[0], other.tokenKey[0] = 1, 2
	now := time.Now()
	tok := s.token4("ops", "summer", "pause", now)
	for _, c := range []struct {
		what                  string
		who, campaign, action string
		at                    time.Time
		srv                   *Server
		want                  bool
	}{
		{"itself", "ops", "summer", "pause", now, s, true},
		{"59 minutes on", "ops", "summer", "pause", now.Add(59 * time.Minute), s, true},
		{"expired", "ops", "summer", "pause", now.Add(tokenTTL + time.Second), s, false},
		{"from the future", "ops", "summer", "pause", now.Add(-2 * time.Minute), s, false},
		{"another user", "mallory", "summer", "pause", now, s, false},
		{"another campaign", "ops", "summe", "pause", now, s, false},
		{"another action", "ops", "summer", "cancel", now, s, false},
		{"another process", "ops", "summer", "pause", now, other, false},
	} {
		if got := c.srv.validToken(tok, c.who, c.campaign, c.action, c.at); got != c.want {
			t.Errorf("%s: valid %v, want %v", c.what, got, c.want)
		}
	}
	for _, bad := range []string{"", ".", "x.y", tok + "A", "1." + tok} {
		if s.validToken(bad, "ops", "summer", "pause", now) {
			t.Errorf("token %q accepted", bad)
		}
	}
}
