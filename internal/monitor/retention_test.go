package monitor_test

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/couponflow/dispatcher/internal/monitor"
)

// A campaign's retention: before it settles, how long its records will be
// kept; once sealed, until when, and where its report was archived.
func TestRetentionShown(t *testing.T) {
	r := newRig(t, monitor.WithBasicAuth(testUser, testPassword), monitor.WithMchID(testMchID))
	ctx := context.Background()
	sends := r.campaign("kept", 2)
	mustContain(t, "/", func() string { _, b := r.get("/", operator); return b }(), "records kept 30 days once settled")
	for _, s := range sends {
		finish(t, r.store, s, succeeded("cp-"+s.OutRequestNo))
	}
	if err := r.store.RecordReport(ctx, "kept", "/srv/archive/kept.csv.gz on ops-1"); err != nil {
		t.Fatal(err)
	}
	if res, err := r.store.Sweep(ctx); err != nil || len(res.Sealed) != 1 {
		t.Fatalf("sweep %+v %v", res, err)
	}
	_, body := r.get("/api/campaigns/kept", operator)
	var c monitor.CampaignDetail
	if err := json.Unmarshal([]byte(body), &c); err != nil {
		t.Fatal(err)
	}
	if c.ExpiresAt == nil || time.Until(*c.ExpiresAt) < 719*time.Hour || c.Retention != "720h0m0s" || c.Report != "/srv/archive/kept.csv.gz on ops-1" {
		t.Fatalf("expires %v, retention %q, report %q\n%s", c.ExpiresAt, c.Retention, c.Report, body)
	}
	_, page := r.get("/campaigns/kept", operator)
	mustContain(t, "/campaigns/kept", page, `data-expires="kept"`, "records kept until "+shownTime(*c.ExpiresAt),
		"report archived to /srv/archive/kept.csv.gz on ops-1")
}
