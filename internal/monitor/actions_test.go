package monitor_test

import (
	"context"
	"encoding/json"
	"html"
	"io"
	"net/http"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/monitor"
)

var tokenRE = regexp.MustCompile(`name="token" value="([^"]+)"`)

// sameOrigin are the headers a browser sends with a form posted from our
// own page.
func sameOrigin(r *rig) []string { return []string{"Origin", r.url, "Sec-Fetch-Site", "same-origin"} }

// post sends a form and returns the response (redirects not followed)
// with its body read.
func (r *rig) post(path string, a auth, form url.Values, hdr ...string) (*http.Response, string) {
	r.t.Helper()
	req, err := http.NewRequest(http.MethodPost, r.url+path, strings.NewReader(form.Encode()))
	if err != nil {
		r.t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	a(req)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	client := &http.Client{Timeout: time.Minute, CheckRedirect: func(*http.Request, []*http.Request) error {
		return http.ErrUseLastResponse
	}}
	resp, err := client.Do(req)
	if err != nil {
		r.t.Fatalf("POST %s: %v", path, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp, string(body)
}

// confirmToken opens an action's confirmation page, checks that it counts
// affected sends, and returns the token of its form.
func (r *rig) confirmToken(campaign, action string, a auth, affects int64) string {
	r.t.Helper()
	resp, body := r.get("/campaigns/"+campaign+"/"+action, a)
	if resp.StatusCode != http.StatusOK {
		r.t.Fatalf("confirmation page of %s: %d\n%s", action, resp.StatusCode, body)
	}
	mustContain(r.t, action+"'s confirmation page", body, `data-affects="`+strconv.FormatInt(affects, 10)+`"`,
		`method="post" action="/campaigns/`+campaign+`/`+action+`"`)
	m := tokenRE.FindStringSubmatch(body)
	if m == nil {
		r.t.Fatalf("no token in the confirmation page:\n%s", body)
	}
	return html.UnescapeString(m[1])
}

func (r *rig) control(campaign string) idempotency.Control {
	r.t.Helper()
	c, err := r.store.ControlOf(context.Background(), campaign)
	if err != nil {
		r.t.Fatal(err)
	}
	return c
}

// The page's pause, resume and cancel, each through its confirmation form,
// change the record as enqueuer campaign pause|resume|cancel does, are
// kept in the audit trail under the basic-auth user, and show on the page
// and in the API.
func TestCampaignActions(t *testing.T) {
	r := newRig(t, monitor.WithBasicAuth(testUser, testPassword))
	op := basic(testUser, testPassword)
	sends := r.campaign("spring", 5)
	finish(t, r.store, sends[0], succeeded("C-0"))

	resp, body := r.get("/campaigns/spring", op)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("campaign page: %d", resp.StatusCode)
	}
	mustContain(t, "campaign page", body, `id="action-pause" href="/campaigns/spring/pause"`, `id="action-cancel"`,
		"4 of 5 sends not yet done", `id="audit-empty"`)
	if strings.Contains(body, `id="action-resume"`) {
		t.Error("a running campaign offers resume")
	}
	// Opening the confirmation changes nothing.
	tok := r.confirmToken("spring", "pause", op, 4)
	if c := r.control("spring"); c != idempotency.Running {
		t.Fatalf("the confirmation page changed the control to %q", c)
	}

	resp, body = r.post("/campaigns/spring/pause", op, url.Values{"token": {tok}}, sameOrigin(r)...)
	if resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("pause: %d\n%s", resp.StatusCode, body)
	}
	if loc := resp.Header.Get("Location"); loc != "/campaigns/spring?did=pause&sends=4" {
		t.Errorf("pause sent the browser to %q", loc)
	}
	if c := r.control("spring"); c != idempotency.Paused {
		t.Fatalf("after pause the control is %q", c)
	}
	// The record holds it: a worker's claim is refused.
	if c, err := r.store.TryClaim(context.Background(), sends[1], "w", time.Minute); err != nil || c.Acquired {
		t.Fatalf("a claim of a paused campaign: %+v, %v", c, err)
	}
	audit, err := r.store.Audit(context.Background(), "spring")
	if err != nil || len(audit) != 1 {
		t.Fatalf("audit trail %+v, %v", audit, err)
	}
	if a := audit[0]; a.Action != "pause" || a.Who != testUser || a.Sends != 4 || a.Note != "monitor" {
		t.Errorf("audit entry %+v, want pause by %s of 4 sends, noted monitor", a, testUser)
	}
	_, body = r.get("/campaigns/spring?did=pause&sends=4", op)
	mustContain(t, "paused campaign page", body, `data-control="spring">paused</span>`, `data-did="pause"`,
		"Paused: 4 sends not yet done wait without a call.", "No call of it is in flight.",
		`id="action-resume"`, `<tr data-action="pause"><td>`, "<td>"+testUser+"</td><td>pause</td><td class=\"n\">4</td><td>monitor</td>")
	if strings.Contains(body, `id="action-pause"`) {
		t.Error("a paused campaign offers pause")
	}
	_, body = r.get("/api/campaigns/spring", op)
	var c monitor.CampaignDetail
	if err := json.Unmarshal([]byte(body), &c); err != nil {
		t.Fatal(err)
	}
	if c.Control != "paused" || len(c.Actions) != 1 || c.Waiting != 4 {
		t.Errorf("API: control %q, actions %+v, waiting %d", c.Control, c.Actions, c.Waiting)
	}

	// Resume.
	tok = r.confirmToken("spring", "resume", op, 4)
	if resp, body := r.post("/campaigns/spring/resume", op, url.Values{"token": {tok}}, sameOrigin(r)...); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("resume: %d\n%s", resp.StatusCode, body)
	}
	if c := r.control("spring"); c != idempotency.Running {
		t.Fatalf("after resume the control is %q", c)
	}

	// Cancel asks for the campaign's name as well.
	tok = r.confirmToken("spring", "cancel", op, 4)
	resp, body = r.post("/campaigns/spring/cancel", op, url.Values{"token": {tok}, "confirm": {"sprin"}}, sameOrigin(r)...)
	if resp.StatusCode != http.StatusBadRequest || r.control("spring") != idempotency.Running {
		t.Fatalf("cancel with the wrong name: %d, control %q\n%s", resp.StatusCode, r.control("spring"), body)
	}
	resp, body = r.post("/campaigns/spring/cancel", op, url.Values{"token": {tok}, "confirm": {"spring"}}, sameOrigin(r)...)
	if resp.StatusCode != http.StatusSeeOther || r.control("spring") != idempotency.CancelledByUser {
		t.Fatalf("cancel: %d, control %q\n%s", resp.StatusCode, r.control("spring"), body)
	}
	st, _ := r.store.Status(context.Background(), "spring")
	if st.ByState[idempotency.Cancelled] != 4 || st.ByState[idempotency.Succeeded] != 1 {
		t.Fatalf("after cancel: %v", st.ByState)
	}
	_, body = r.get("/campaigns/spring", op)
	mustContain(t, "cancelled campaign page", body, `data-control="spring">cancelled</span>`, `<span data-cancelled="spring">4 cancelled</span>`,
		"5 of 5 done (100.0%)", `<tr data-action="cancel">`, `<div class="" data-state="cancelled"><b>4</b>cancelled</div>`)
	if strings.Contains(body, `id="action-`) {
		t.Error("a cancelled campaign still offers an action")
	}
	// Pausing it now is refused, as enqueuer refuses it.
	tok = r.confirmToken("spring", "pause", op, 0)
	if resp, body := r.post("/campaigns/spring/pause", op, url.Values{"token": {tok}}, sameOrigin(r)...); resp.StatusCode != http.StatusConflict ||
		!strings.Contains(body, "is cancelled") {
		t.Errorf("pause of a cancelled campaign: %d %s", resp.StatusCode, body)
	}
}

// A request that did not come from the confirmation form of this user,
// campaign and action, or that a browser says came from another site, is
// refused and changes nothing.
func TestCampaignActionsRefuseCrossSite(t *testing.T) {
	r := newRig(t, monitor.WithBasicAuth(testUser, testPassword), monitor.WithToken(testToken))
	op := basic(testUser, testPassword)
	r.campaign("summer", 3)
	r.campaign("winter", 3)
	tok := r.confirmToken("summer", "pause", op, 3)

	for _, c := range []struct {
		what, path string
		a          auth
		form       url.Values
		hdr        []string
	}{
		{"no token", "/campaigns/summer/pause", op, url.Values{}, sameOrigin(r)},
		{"a forged token", "/campaigns/summer/pause", op, url.Values{"token": {strconv.FormatInt(time.Now().Unix(), 10) + ".AAAA"}}, sameOrigin(r)},
		{"a token of another action", "/campaigns/summer/cancel", op, url.Values{"token": {tok}, "confirm": {"summer"}}, sameOrigin(r)},
		{"a token of another campaign", "/campaigns/winter/pause", op, url.Values{"token": {tok}}, sameOrigin(r)},
		{"a token of another user", "/campaigns/summer/pause", basic("mallory", testToken), url.Values{"token": {tok}}, sameOrigin(r)},
		{"another site, with a good token", "/campaigns/summer/pause", op, url.Values{"token": {tok}}, []string{"Origin", "https://evil.example", "Sec-Fetch-Site", "cross-site"}},
		{"another origin, no Sec-Fetch-Site", "/campaigns/summer/pause", op, url.Values{"token": {tok}}, []string{"Origin", "https://evil.example"}},
		// An old browser that sends neither header: the token still holds.
		{"no headers, no token", "/campaigns/summer/pause", op, url.Values{}, nil},
	} {
		resp, body := r.post(c.path, c.a, c.form, c.hdr...)
		if resp.StatusCode != http.StatusForbidden {
			t.Errorf("%s: %d, want 403\n%s", c.what, resp.StatusCode, body)
		}
	}
	// GET never acts: the path shows the confirmation, a HEAD or another
	// method is no action.
	if resp, _ := r.do(http.MethodPut, "/campaigns/summer/pause", op, sameOrigin(r)...); resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("PUT: %d, want 405", resp.StatusCode)
	}
	for _, name := range []string{"summer", "winter"} {
		if c := r.control(name); c != idempotency.Running {
			t.Fatalf("campaign %s: control %q after refused requests", name, c)
		}
		if a, _ := r.store.Audit(context.Background(), name); len(a) != 0 {
			t.Fatalf("campaign %s: audit trail %+v after refused requests", name, a)
		}
	}
	// The same token from our page works: the refusals were not of it.
	if resp, body := r.post("/campaigns/summer/pause", op, url.Values{"token": {tok}}, sameOrigin(r)...); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("the good request: %d\n%s", resp.StatusCode, body)
	}
	if c := r.control("summer"); c != idempotency.Paused {
		t.Fatalf("control %q", c)
	}
	// A bearer token's user is "token" in the audit trail.
	tok = r.confirmToken("winter", "pause", bearer(testToken), 3)
	if resp, body := r.post("/campaigns/winter/pause", bearer(testToken), url.Values{"token": {tok}}); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("pause with a bearer token: %d\n%s", resp.StatusCode, body)
	}
	if a, _ := r.store.Audit(context.Background(), "winter"); len(a) != 1 || a[0].Who != "token" {
		t.Errorf("audit after a bearer pause: %+v", a)
	}
}

// Read-only, the page offers no action and the routes refuse them.
func TestCampaignActionsReadOnly(t *testing.T) {
	r := newRig(t, monitor.WithBasicAuth(testUser, testPassword), monitor.WithReadOnly(true))
	op := basic(testUser, testPassword)
	r.campaign("summer", 3)
	_, body := r.get("/campaigns/summer", op)
	mustContain(t, "read-only campaign page", body, `id="readonly"`, "enqueuer campaign pause|resume|cancel --campaign summer")
	for _, s := range []string{`id="actions"`, `/campaigns/summer/pause"`, `/campaigns/summer/cancel"`} {
		if strings.Contains(body, s) {
			t.Errorf("read-only page contains %q", s)
		}
	}
	for _, action := range []string{"pause", "resume", "cancel"} {
		if resp, body := r.get("/campaigns/summer/"+action, op); resp.StatusCode != http.StatusForbidden || !strings.Contains(body, "read-only") {
			t.Errorf("GET confirmation of %s read-only: %d %s", action, resp.StatusCode, body)
		}
		if resp, body := r.post("/campaigns/summer/"+action, op, url.Values{"token": {"x"}, "confirm": {"summer"}}, sameOrigin(r)...); resp.StatusCode != http.StatusForbidden ||
			!strings.Contains(body, "read-only") {
			t.Errorf("POST %s read-only: %d %s", action, resp.StatusCode, body)
		}
	}
	if c := r.control("summer"); c != idempotency.Running {
		t.Fatalf("control %q", c)
	}
}

// Without credentials (loopback) the audit trail names "loopback".
func TestCampaignActionsLoopback(t *testing.T) {
	r := newRig(t)
	r.campaign("summer", 2)
	tok := r.confirmToken("summer", "pause", noAuth, 2)
	if resp, body := r.post("/campaigns/summer/pause", noAuth, url.Values{"token": {tok}}, sameOrigin(r)...); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("pause: %d\n%s", resp.StatusCode, body)
	}
	if a, _ := r.store.Audit(context.Background(), "summer"); len(a) != 1 || a[0].Who != "loopback" {
		t.Errorf("audit: %+v", a)
	}
	if resp, _ := r.get("/campaigns/nope/pause", noAuth); resp.StatusCode != http.StatusNotFound {
		t.Errorf("confirmation for an unknown campaign: %d", resp.StatusCode)
	}
	if resp, _ := r.get("/campaigns/summer/delete", noAuth); resp.StatusCode != http.StatusNotFound {
		t.Errorf("an unknown action: %d", resp.StatusCode)
	}
}

// The page shows a scheduled start still to come, and the time the
// campaign was found done (meta done_at, written by package notify).
func TestCampaignScheduleAndDone(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	r.campaign("later", 3)
	start := time.Now().Add(2 * time.Hour).Truncate(time.Second)
	if _, err := r.store.SetStartAt(ctx, "later", start); err != nil {
		t.Fatal(err)
	}
	_, body := r.get("/campaigns/later", noAuth)
	mustContain(t, "scheduled campaign page", body, `<span data-start="later">3 sends scheduled to start at `+shownTime(start)+`</span>`,
		`<span class="running">scheduled</span>`)

	sends := r.campaign("over", 2)
	for i, s := range sends {
		finish(t, r.store, s, succeeded("C-"+strconv.Itoa(i)))
	}
	doneAt := time.Now().Add(-time.Minute).Truncate(time.Millisecond)
	if err := r.rdb.HSet(ctx, r.store.Keys().Meta("over"), "done_at", doneAt.UnixMilli()).Err(); err != nil {
		t.Fatal(err)
	}
	_, body = r.get("/campaigns/over", noAuth)
	mustContain(t, "done campaign page", body, `<span data-done-at="over">done at `+shownTime(doneAt)+`</span>`)
	_, body = r.get("/api/campaigns/over", noAuth)
	var c monitor.CampaignDetail
	if err := json.Unmarshal([]byte(body), &c); err != nil {
		t.Fatal(err)
	}
	if c.DoneAt == nil || !c.DoneAt.Equal(doneAt) || c.Control != "running" {
		t.Errorf("API: done_at %v, want %v; control %q", c.DoneAt, doneAt, c.Control)
	}
}
