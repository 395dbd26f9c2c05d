package idempotency

import (
	"context"
	"fmt"

	"github.com/redis/go-redis/v9"
)

// loseScript removes a pending send (KEYS[1] record, KEYS[2] members,
// KEYS[3] counts; ARGV[1] its member) and returns 1, or returns 0.
var loseScript = redis.NewScript(`
if redis.call('HGET', KEYS[1], 'state') ~= 'pending' then return 0 end
redis.call('DEL', KEYS[1])
redis.call('LREM', KEYS[2], 0, ARGV[1])
redis.call('HINCRBY', KEYS[3], 'total', -1)
redis.call('HINCRBY', KEYS[3], 'pending', -1)
return 1`)

// LoseForDrill removes a pending send's record, its place in its campaign
// and its counts, as a Redis failover that lost the send's writes leaves
// it: for tests and recovery drills of Status.Missing. A send that is not
// pending is left alone (and false returned).
func (s *Store) LoseForDrill(ctx context.Context, send Send) (bool, error) {
	n, err := loseScript.Run(ctx, s.rdb, []string{
		s.recordKey(send.Campaign, send.MchID, send.OutRequestNo), s.membersKey(send.Campaign), s.countsKey(send.Campaign),
	}, send.MchID+":"+send.OutRequestNo).Int()
	if err != nil {
		return false, fmt.Errorf("idempotency: dropping %s: %w", send.OutRequestNo, err)
	}
	return n == 1, nil
}
