package monitor_test

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/couponflow/dispatcher/internal/monitor"
)

// Records lost after the enqueue counted them: the API and the pages say
// how many, and that running the enqueue again restores them.
func TestMissingRecords(t *testing.T) {
	r := newRig(t, monitor.WithBasicAuth(testUser, testPassword), monitor.WithMchID(testMchID))
	ctx := context.Background()
	sends := r.campaign("lossy", 5)
	if _, err := r.store.RecordExpected(ctx, "lossy"); err != nil {
		t.Fatal(err)
	}
	_, body := r.get("/api/campaigns/lossy", operator)
	if strings.Contains(body, "records missing") {
		t.Fatalf("a warning with nothing missing:\n%s", body)
	}
	for _, s := range sends[3:] {
		if ok, err := r.store.LoseForDrill(ctx, s); err != nil || !ok {
			t.Fatal(ok, err)
		}
	}
	resp, body := r.get("/api/campaigns/lossy", operator)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("%d\n%s", resp.StatusCode, body)
	}
	var c monitor.CampaignDetail
	if err := json.Unmarshal([]byte(body), &c); err != nil {
		t.Fatal(err)
	}
	const advice = "2 records missing (Redis lost writes); run the same enqueuer campaign command again to restore them"
	if c.Total != 3 || c.Expected != 5 || c.Missing != 2 || c.Warning != advice {
		t.Errorf("total %d, expected %d, missing %d, warning %q", c.Total, c.Expected, c.Missing, c.Warning)
	}
	for _, path := range []string{"/campaigns/lossy", "/"} {
		_, body = r.get(path, operator)
		mustContain(t, path, body, `data-missing="2"`, advice)
	}
}

// The rows the enqueuer skipped as invalid are in no count: the card says
// how many, shows the first, and what to do.
func TestSkippedRowsShown(t *testing.T) {
	r := newRig(t, monitor.WithBasicAuth(testUser, testPassword))
	r.campaign("typos", 2)
	if err := r.store.RecordSkipped(context.Background(), "typos", 1234, []string{`line 4: openid "bad id" has a character outside letters, digits, _ and -`}); err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{"/campaigns/typos", "/"} {
		_, body := r.get(path, operator)
		mustContain(t, path, body, `data-skipped="1234"`, "1,234 rows of its file skipped as invalid",
			`<code>line 4: openid &#34;bad id&#34; has a character outside letters, digits, _ and -</code>`, "The first 1 shown", "--dry-run")
	}
	_, body := r.get("/api/campaigns/typos", operator)
	mustContain(t, "API", body, `"skipped_invalid_rows": 1234`, `"line 4: openid`)
	r.campaign("clean", 1)
	if _, body := r.get("/campaigns/clean", operator); strings.Contains(body, "data-skipped") {
		t.Errorf("a campaign with no skipped row shows some")
	}
}
