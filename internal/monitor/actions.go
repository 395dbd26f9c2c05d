package monitor

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/couponflow/dispatcher/internal/campaignctl"
)

// The campaign page's actions: pause, resume, cancel (package campaignctl,
// as enqueuer campaign pause|resume|cancel).
//
// Each is two steps. GET /campaigns/{name}/{action} shows what the action
// would touch (how many sends) and a form; POST to the same path does it
// and sends the browser back to the campaign page (303), where the control
// and the audit trail show the result.
//
// Against cross-site requests, two independent defences, since the
// browser replays basic auth to any site that makes it send a request:
//   - http.CrossOriginProtection (routes) refuses a POST that a browser
//     marks cross-site (Sec-Fetch-Site) or whose Origin is not our Host;
//   - the form carries a token, an HMAC under a key of this process over
//     the user, the campaign, the action and the time it was issued, good
//     for tokenTTL. Another site cannot read our pages (no CORS, frames
//     refused), so it cannot get one. This also holds for browsers that
//     send neither header, and it proves the POST comes from the
//     confirmation form, not from a link or a script that skipped it.
//
// A token over the user, not a session cookie: the monitor has no
// sessions (basic auth, a bearer token, or loopback without credentials),
// and a stateless token needs none; a restart invalidates the open forms,
// which are asked for again.

// tokenTTL is how long a confirmation form stays good.
const tokenTTL = time.Hour

// actions are those the pages offer.
var actions = map[string]bool{"pause": true, "resume": true, "cancel": true}

// actionTimeout bounds an action once asked for: it runs to the end even
// if the browser goes away (a cancel half done would leave sends to settle).
const actionTimeout = 2 * time.Minute

// confirmData is what the confirmation page renders.
type confirmData struct {
	*pageData
	Action   string
	Campaign Campaign
	Token    string
	Post     string // where the form posts
	// Wait is how long the action may wait for calls in flight.
	Wait time.Duration
}

func (s *Server) confirmPage(w http.ResponseWriter, r *http.Request) {
	name, action := r.PathValue("name"), r.PathValue("action")
	if !actions[action] {
		http.NotFound(w, r)
		return
	}
	if s.readOnly {
		refuse(w, http.StatusForbidden, "the monitor is read-only (MONITOR_READONLY): campaigns cannot be paused, resumed or cancelled from it; use enqueuer campaign "+action)
		return
	}
	c, ok, err := s.campaign(r.Context(), name, false)
	if err == nil && !ok {
		refuse(w, http.StatusNotFound, fmt.Sprintf("no campaign %q", name))
		return
	}
	d := &confirmData{pageData: s.newPage(action + " campaign " + name), Action: action, Campaign: c,
		Token: s.token4(who(s, r), name, action, time.Now()), Post: c.Links.Page + "/" + action,
		Wait: campaignctl.DefaultDrainWait}
	d.Form = true
	s.renderData(w, "confirm", d, d.pageData, err)
}

// act does the action the confirmation form asks for.
func (s *Server) act(w http.ResponseWriter, r *http.Request) {
	name, action := r.PathValue("name"), r.PathValue("action")
	if !actions[action] {
		http.NotFound(w, r)
		return
	}
	if s.readOnly {
		refuse(w, http.StatusForbidden, "the monitor is read-only (MONITOR_READONLY): campaigns cannot be paused, resumed or cancelled from it; use enqueuer campaign "+action)
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, 16<<10)
	if err := r.ParseForm(); err != nil {
		refuse(w, http.StatusBadRequest, "unreadable form: "+err.Error())
		return
	}
	who := who(s, r)
	if !s.validToken(r.PostForm.Get("token"), who, name, action, time.Now()) {
		s.log.Warn("monitor: campaign action refused: bad or missing form token", "campaign", name, "action", action, "who", who)
		refuse(w, http.StatusForbidden, "this "+action+" did not come from the monitor's confirmation form, or the form is more than "+
			tokenTTL.String()+" old, or the monitor restarted since: open the campaign page and ask again")
		return
	}
	if action == "cancel" && strings.TrimSpace(r.PostForm.Get("confirm")) != name {
		refuse(w, http.StatusBadRequest, "not cancelled: type the campaign's name to confirm")
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), actionTimeout)
	defer cancel()
	var res campaignctl.Result
	var err error
	switch action {
	case "pause":
		res, err = s.ctl.Pause(ctx, name, who)
	case "resume":
		res, err = s.ctl.Resume(ctx, name, who)
	case "cancel":
		res, err = s.ctl.Cancel(ctx, name, who)
	}
	if campaignctl.IsRefused(err) {
		refuse(w, http.StatusConflict, err.Error())
		return
	}
	if err != nil {
		s.log.Warn("monitor: campaign action failed", "campaign", name, "action", action, "who", who, "err", err)
		refuse(w, http.StatusServiceUnavailable, action+" failed: "+err.Error())
		return
	}
	// The action holds even when waking the tasks failed: they come up at
	// their retry time.
	q := url.Values{"did": {action}, "sends": {strconv.FormatInt(res.Waiting, 10)}}
	if res.InFlight != 0 {
		q.Set("in_flight", strconv.FormatInt(res.InFlight, 10))
	}
	if res.WakeErr != nil {
		s.log.Warn("monitor: waking the campaign's waiting tasks failed; they come up at their retry time", "campaign", name, "action", action, "err", res.WakeErr)
		q.Set("wake", "failed")
	}
	s.log.Info("monitor: campaign action", "campaign", name, "action", action, "who", who, "sends", res.Waiting,
		"in_flight", res.InFlight, "woken", res.Woken)
	http.Redirect(w, r, "/campaigns/"+url.PathEscape(name)+"?"+q.Encode(), http.StatusSeeOther)
}

// who names the user of a request for the audit trail: the basic-auth
// user, "token" for a bearer token, "loopback" without credentials.
func who(s *Server, r *http.Request) string {
	if !s.Authenticated() {
		return "loopback"
	}
	if u, _, ok := r.BasicAuth(); ok && u != "" {
		// With a token as its password the name is the browser's to choose;
		// it is still the name the operator gave.
		return u
	}
	return "token"
}

// token4 signs who, campaign and action at now.
func (s *Server) token4(who, campaign, action string, now time.Time) string {
	at := strconv.FormatInt(now.Unix(), 10)
	return at + "." + base64.RawURLEncoding.EncodeToString(s.mac(who, campaign, action, at))
}

func (s *Server) mac(who, campaign, action, at string) []byte {
	m := hmac.New(sha256.New, s.tokenKey[:])
	// Lengths first, so that no two tuples sign the same bytes.
	fmt.Fprintf(m, "%d:%s|%d:%s|%d:%s|%s", len(who), who, len(campaign), campaign, len(action), action, at)
	return m.Sum(nil)
}

// validToken checks a token from token4 for who, campaign and action, no
// older than tokenTTL (nor from the future beyond a minute's skew).
func (s *Server) validToken(tok, who, campaign, action string, now time.Time) bool {
	at, sig, ok := strings.Cut(tok, ".")
	if !ok {
		return false
	}
	sec, err := strconv.ParseInt(at, 10, 64)
	if err != nil {
		return false
	}
	issued := time.Unix(sec, 0)
	if now.Sub(issued) > tokenTTL || issued.Sub(now) > time.Minute {
		return false
	}
	got, err := base64.RawURLEncoding.DecodeString(sig)
	if err != nil {
		return false
	}
	return hmac.Equal(got, s.mac(who, campaign, action, at))
}

// refuse answers a refused action in plain text, which no browser runs.
func refuse(w http.ResponseWriter, code int, msg string) {
	h := w.Header()
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(code)
	fmt.Fprintf(w, "%d %s: %s\n", code, http.StatusText(code), msg)
}
