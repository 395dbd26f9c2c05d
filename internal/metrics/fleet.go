package metrics

import (
	"context"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/couponflow/dispatcher/internal/breaker"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/ratelimit"
	"github.com/couponflow/dispatcher/internal/tasks"
)

// scrapeTimeout bounds the Redis reads of one scrape, below Prometheus's
// default scrape timeout of 10s.
const scrapeTimeout = 5 * time.Second

// endpoints are the limiter's endpoints, in the order they are reported:
// the sends' (tasks.Kinds), then the list API's.
var endpoints = append(tasks.Endpoints(), ratelimit.ListCoupons)

// Sources of couponflow_scrape_error.
const (
	sourceRateLimit = "ratelimit"
	sourceBreakers  = "breakers"
	sourceCampaigns = "campaigns"
)

var (
	rateDesc = prometheus.NewDesc("couponflow_ratelimit_rate",
		"The shared rate of an endpoint for the merchant, calls per second: the configured limit, or less after recent 429s.",
		[]string{"endpoint"}, nil)
	breakerDesc = prometheus.NewDesc("couponflow_breaker_open",
		"1 for every stock of the merchant whose budget breaker is open; a closed stock is absent.",
		[]string{"stock_id"}, nil)
	sendsDesc = prometheus.NewDesc("couponflow_campaign_sends",
		"Sends of a campaign in each state (pending, in_flight, retrying, waiting_rate, waiting_budget, succeeded, failed).",
		[]string{"campaign", "state"}, nil)
	failedDesc = prometheus.NewDesc("couponflow_campaign_failed",
		"Sends of a campaign failed for good, by WeChat's code.",
		[]string{"campaign", "code"}, nil)
	totalDesc = prometheus.NewDesc("couponflow_campaign_total",
		"Sends registered in a campaign.",
		[]string{"campaign"}, nil)
	sendRateDesc = prometheus.NewDesc("couponflow_campaign_send_rate",
		"Successful sends of a campaign per second over the last minute.",
		[]string{"campaign"}, nil)
	scrapeErrDesc = prometheus.NewDesc("couponflow_scrape_error",
		"1 if reading this source from Redis failed during the scrape (its metrics are then missing), else 0.",
		[]string{"source"}, nil)
)

// fleet is the collector of NewFleetCollector.
type fleet struct {
	store    *idempotency.Store
	limiter  *ratelimit.Limiter
	breakers *breaker.Breakers
	mchID    string
}

// NewFleetCollector reports what the fleet shares in Redis, read at every
// scrape: the merchant's shared rate per endpoint, its open budget
// breakers, and the counters of every campaign in store. A source that
// cannot be read is left out and flagged by couponflow_scrape_error; the
// scrape itself never fails. limiter or breakers may be nil to leave their
// metrics out.
func NewFleetCollector(store *idempotency.Store, limiter *ratelimit.Limiter, breakers *breaker.Breakers, mchID string) prometheus.Collector {
	return &fleet{store: store, limiter: limiter, breakers: breakers, mchID: mchID}
}

// Describe implements prometheus.Collector.
func (f *fleet) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{rateDesc, breakerDesc, sendsDesc, failedDesc, totalDesc, sendRateDesc, scrapeErrDesc} {
		ch <- d
	}
}

// Collect implements prometheus.Collector. The sources are read at once,
// so that a Redis that is down costs one command's retries, not the sum.
func (f *fleet) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), scrapeTimeout)
	defer cancel()
	var wg sync.WaitGroup
	source := func(name string, collect func(context.Context, chan<- prometheus.Metric) error) {
		wg.Go(func() {
			v := 0.0
			if err := collect(ctx, ch); err != nil {
				v = 1
			}
			ch <- prometheus.MustNewConstMetric(scrapeErrDesc, prometheus.GaugeValue, v, name)
		})
	}
	if f.limiter != nil {
		source(sourceRateLimit, f.collectRates)
	}
	if f.breakers != nil {
		source(sourceBreakers, f.collectBreakers)
	}
	if f.store != nil {
		source(sourceCampaigns, f.collectCampaigns)
	}
	wg.Wait()
}

func (f *fleet) collectRates(ctx context.Context, ch chan<- prometheus.Metric) error {
	for _, ep := range endpoints {
		if f.limiter.Limit(ep).N == 0 {
			continue // not configured
		}
		rate, err := f.limiter.Rate(ctx, f.mchID, ep)
		if err != nil {
			return err // the next endpoint would fail the same way
		}
		ch <- prometheus.MustNewConstMetric(rateDesc, prometheus.GaugeValue, rate, string(ep))
	}
	return nil
}

func (f *fleet) collectBreakers(ctx context.Context, ch chan<- prometheus.Metric) error {
	open, err := f.breakers.Open(ctx, f.mchID)
	if err != nil {
		return err
	}
	for _, st := range open {
		ch <- prometheus.MustNewConstMetric(breakerDesc, prometheus.GaugeValue, 1, st.StockID)
	}
	return nil
}

func (f *fleet) collectCampaigns(ctx context.Context, ch chan<- prometheus.Metric) error {
	names, err := f.store.Campaigns(ctx)
	if err != nil {
		return err
	}
	for _, name := range names {
		st, err := f.store.Status(ctx, name)
		if err != nil {
			return err // the rest would fail the same way
		}
		for _, state := range idempotency.States {
			ch <- prometheus.MustNewConstMetric(sendsDesc, prometheus.GaugeValue, float64(st.ByState[state]), name, string(state))
		}
		for code, n := range st.FailedByCode {
			ch <- prometheus.MustNewConstMetric(failedDesc, prometheus.GaugeValue, float64(n), name, code)
		}
		ch <- prometheus.MustNewConstMetric(totalDesc, prometheus.GaugeValue, float64(st.Total), name)
		ch <- prometheus.MustNewConstMetric(sendRateDesc, prometheus.GaugeValue, st.Rate, name)
	}
	return nil
}
