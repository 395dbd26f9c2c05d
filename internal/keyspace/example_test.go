package keyspace_test

import (
	"fmt"

	"github.com/couponflow/dispatcher/internal/keyspace"
)

// Every key of ours comes from a Keys: one prefix, and the hash tags that
// decide what shares a Redis Cluster slot. A campaign's record and
// counters share its tag, so one script updates both; a user's lock and a
// rate limit have tags of their own.
func ExampleKeys() {
	keys := keyspace.New("acme")
	fmt.Println(keys.Record("spring", "1900000109", "1900000109-0001"))
	fmt.Println(keys.Counts("spring"))
	fmt.Println(keys.UserLock("1900000109", "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"))
	fmt.Println(keys.Limiter("1900000109", "favor_send"))
	// Output:
	// acme:{spring}:send:1900000109:1900000109-0001
	// acme:{spring}:counts
	// acme:user:{1900000109:oUpF8uMuAJO_M2pxb1Q9zNjWeS6o}
	// acme:rl:{1900000109:favor_send}
}
