package main

import (
	"testing"

	"github.com/couponflow/dispatcher/internal/ratelimit"
)

// status shows the limit the fleet uses, as the workers wrote it.
func TestSharedLine(t *testing.T) {
	for _, c := range []struct {
		ep   ratelimit.Endpoint
		sh   ratelimit.Shared
		want string
	}{
		{ratelimit.SendCoupon, ratelimit.Shared{Limit: 500, Rate: 500},
			"favor_send: no worker has run yet; default limit 500/s"},
		{ratelimit.SendCoupon, ratelimit.Shared{Limit: 300, WorkersLimit: true, Rate: 300},
			"favor_send: workers' limit 300/s"},
		{ratelimit.SendCoupon, ratelimit.Shared{Limit: 500, WorkersLimit: true, Rate: 97, Ceiling: 100.04},
			"favor_send: workers' limit 500/s, WeChat's limit learned from its 429s 100.0/s"},
		{ratelimit.SendCoupon, ratelimit.Shared{Limit: 500, WorkersLimit: true, Rate: 125, Measuring: true},
			"favor_send: workers' limit 500/s, measuring WeChat's limit after a 429"},
		{ratelimit.SendMultiuse, ratelimit.Shared{Limit: 1000.0 / 60, WorkersLimit: true, Rate: 1000.0 / 60},
			"multiuse_send: workers' limit 1000/m"},
	} {
		if got := sharedLine(c.ep, c.sh); got != c.want {
			t.Errorf("%+v: %q, want %q", c.sh, got, c.want)
		}
	}
}
