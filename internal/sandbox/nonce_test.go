package sandbox

import (
	"testing"
	"time"
)

func TestNonceCache(t *testing.T) {
	c := newNonceCache()
	c.max = 3
	t0 := c.since
	if !c.add("a", t0) || c.add("a", t0.Add(time.Minute)) {
		t.Fatal("a nonce was accepted twice")
	}
	// After one rotation it is still remembered; after two it is forgotten.
	if c.add("a", t0.Add(c.period)) {
		t.Fatal("forgotten after one rotation")
	}
	if !c.add("a", t0.Add(2*c.period)) {
		t.Fatal("still remembered after two rotations")
	}
	// A full generation rotates early, keeping memory bounded.
	for _, n := range []string{"b", "c", "d", "e", "f", "g", "h"} {
		c.add(n, t0.Add(2*c.period))
	}
	if len(c.cur)+len(c.prev) > 2*c.max {
		t.Fatalf("cache holds %d nonces", len(c.cur)+len(c.prev))
	}
}
