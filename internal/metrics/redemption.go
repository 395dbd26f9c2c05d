package metrics

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Outcomes of one redemption notification, the values of the outcome label
// of couponflow_redemption_notifications_total.
const (
	NotifyRecorded  = "recorded"    // verified, decrypted, written on the send's record
	NotifyDuplicate = "duplicate"   // its coupon's redemption was recorded before: acknowledged, counted once
	NotifyNotOurs   = "not_ours"    // a coupon no send of ours issued: acknowledged, counted
	NotifyOther     = "other_event" // a verified event other than COUPON.USE: acknowledged
	NotifyBadSig    = "refused_signature"
	NotifyStale     = "refused_stale"
	NotifyReplay    = "refused_replay"
	NotifyDecrypt   = "refused_decrypt" // wrong APIv3 key or tampered ciphertext
	NotifyMalformed = "refused_malformed"
	NotifyError     = "error" // a Redis error: not acknowledged, WeChat delivers it again
)

var notifyOutcomes = []string{NotifyRecorded, NotifyDuplicate, NotifyNotOurs, NotifyOther, NotifyBadSig,
	NotifyStale, NotifyReplay, NotifyDecrypt, NotifyMalformed, NotifyError}

// Redemptions is the receiver's and redemptions sync's metrics. A nil
// *Redemptions does nothing.
type Redemptions struct {
	notifications *prometheus.CounterVec
	redeemed      *prometheus.CounterVec
	wait          prometheus.Histogram
}

// NewRedemptions returns unregistered redemption metrics.
func NewRedemptions() *Redemptions {
	r := &Redemptions{
		notifications: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "couponflow_redemption_notifications_total",
			Help: "COUPON.USE notifications the receiver handled, by outcome: recorded, duplicate, not_ours, other_event, refused_signature, refused_stale, refused_replay, refused_decrypt, refused_malformed, error.",
		}, []string{"outcome"}),
		redeemed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "couponflow_redemptions_total",
			Help: "Coupons of ours recorded as used, once each, by source: notify (the receiver) or sync (enqueuer redemptions sync, a notification missed).",
		}, []string{"source"}),
		wait: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "couponflow_redemption_seconds",
			Help: "Time from a coupon's send (its success recorded) to its use (consume_time), for each redemption recorded.",
			Buckets: []float64{60, 300, 900, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 3 * 86400, 7 * 86400,
				14 * 86400, 30 * 86400},
		}),
	}
	for _, o := range notifyOutcomes {
		r.notifications.WithLabelValues(o)
	}
	r.redeemed.WithLabelValues("notify")
	r.redeemed.WithLabelValues("sync")
	return r
}

// Register registers every metric with reg.
func (r *Redemptions) Register(reg prometheus.Registerer) error {
	for _, c := range []prometheus.Collector{r.notifications, r.redeemed, r.wait} {
		if err := reg.Register(c); err != nil {
			return err
		}
	}
	return nil
}

// Notification counts one notification by outcome (a Notify* constant).
func (r *Redemptions) Notification(outcome string) {
	if r == nil {
		return
	}
	r.notifications.WithLabelValues(outcome).Inc()
}

// Redeemed counts one redemption recorded, from source ("notify" or
// "sync"), and its time from send to use.
func (r *Redemptions) Redeemed(source string, wait time.Duration) {
	if r == nil {
		return
	}
	r.redeemed.WithLabelValues(source).Inc()
	r.wait.Observe(max(wait, 0).Seconds())
}
