package sandbox_test

import (
	"fmt"
	"testing"

	"github.com/couponflow/dispatcher/internal/sandbox"
)

// BenchmarkSendCoupon measures sends through the SDK, client and sandbox on
// one machine: both sides sign with RSA, so the sandbox takes about half.
func BenchmarkSendCoupon(b *testing.B) {
	c := sdk(b, shared)
	k := newStock(b, shared, sandbox.StockSpec{Budget: 1 << 40})
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := send(c, shared, sendArgs{openid: fmt.Sprint("bench-", seq.Add(1)), stock: k.ID}); err != nil {
				b.Error(err)
				return
			}
		}
	})
}
