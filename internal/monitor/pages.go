package monitor

import (
	"bytes"
	"context"
	"crypto/rand"
	"embed"
	"encoding/base64"
	"errors"
	"fmt"
	"html/template"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/couponflow/dispatcher/internal/ratelimit"
)

//go:embed templates/*.html
var templateFS embed.FS

var pages = template.Must(template.New("").Funcs(template.FuncMap{
	"pct": func(n, total int64) string {
		if total <= 0 {
			return "0"
		}
		return fmt.Sprintf("%.3f", 100*float64(n)/float64(total))
	},
	"refreshSeconds": func(ms int64) int64 { return max(1, (ms+999)/1000) },
	"rate":           func(r float64) string { return fmt.Sprintf("%.1f", r) },
	"mul100":         func(r float64) float64 { return 100 * r },
	"int64":          func(n int) int64 { return int64(n) },
	"num":            thousands,
	"per":            ratePer,
	"span": func(s string) string {
		if d, err := time.ParseDuration(s); err == nil {
			return ago(d)
		}
		return s
	},
	"when": func(t time.Time) template.HTML { return when(t, time.Now()) },
}).ParseFS(templateFS, "templates/*.html"))

// pageData is what both pages render.
type pageData struct {
	Title     string
	Nonce     string
	RefreshMS int64
	// Active: some campaign shown is not done, so the page refreshes.
	Active    bool
	Campaigns []Campaign
	Merchants []Merchant
	Queues    []Queue
	// Tally sets the campaigns' waiting sends beside asynq's live tasks
	// (index page only).
	Tally     *Tally
	QueueLink string
	Monitor   string // asynqmon's root
	ReadOnly  bool
	// MonReadOnly: asynqmon refuses changes (Server.AsynqmonReadOnly).
	MonReadOnly bool
	Updated     time.Time
	// StallAfter is how long without a change makes a campaign stalled.
	StallAfter string
	// Error is why Redis could not be read, ErrorTitle that in a line.
	Error      string
	ErrorTitle string
	Single     bool // the page of one campaign
	Form       bool // a confirmation form, which does not refresh
	// Did is the action just taken, on the page the browser is sent back
	// to; nil otherwise.
	Did *didData
}

// didData is what the campaign page says about the action just taken
// (from the query of act's redirect: it only picks which sentence to show
// and the numbers in it, so a forged link can say nothing else).
type didData struct {
	Action     string // pause, resume or cancel
	Sends      int64  // sends not yet done when it was taken
	InFlight   int64  // still in flight once the wait was over (-1: unread)
	WakeFailed bool
}

// didFrom reads a didData from act's redirect query.
func didFrom(q url.Values) *didData {
	a := q.Get("did")
	if !actions[a] {
		return nil
	}
	d := &didData{Action: a, WakeFailed: q.Get("wake") == "failed"}
	d.Sends, _ = strconv.ParseInt(q.Get("sends"), 10, 64)
	d.InFlight, _ = strconv.ParseInt(q.Get("in_flight"), 10, 64)
	return d
}

func (s *Server) indexPage(w http.ResponseWriter, r *http.Request) {
	d := s.newPage("couponflow campaigns")
	cs, err := s.campaigns(r.Context())
	if err == nil {
		d.Campaigns = cs
		// The list always refreshes: a new campaign may appear at any
		// moment (the empty page says it will). A done campaign's own
		// page stops.
		d.Active = true
		d.Merchants, err = s.merchants(r.Context(), cs)
	}
	if err == nil {
		d.Queues, err = s.queues()
	}
	if err == nil {
		t := s.tally(d.Campaigns, d.Queues)
		d.Tally = &t
	}
	s.render(w, "index", d, err)
}

func (s *Server) campaignPage(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	d := s.newPage("campaign " + name)
	d.Single = true
	d.Did = didFrom(r.URL.Query())
	c, ok, err := s.campaign(r.Context(), name, true)
	if err == nil && !ok {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.WriteHeader(http.StatusNotFound)
		fmt.Fprintf(w, "no campaign %q\n", name)
		return
	}
	if err == nil {
		d.Campaigns = []Campaign{c}
		var m Merchant
		if m, err = s.merchant(r.Context(), c.MchID); err == nil {
			d.Merchants = []Merchant{holding(m, c)}
		}
	}
	s.render(w, "campaign", d, err)
}

func (s *Server) newPage(title string) *pageData {
	var nonce [16]byte
	_, _ = rand.Read(nonce[:])
	return &pageData{
		Title: title, Nonce: base64.RawURLEncoding.EncodeToString(nonce[:]),
		RefreshMS: s.refresh.Milliseconds(), QueueLink: s.queueLink(s.queue), Monitor: RootPath + "/",
		ReadOnly: s.readOnly, MonReadOnly: s.AsynqmonReadOnly(), Updated: time.Now(), StallAfter: ago(StallAfter),
	}
}

func (s *Server) render(w http.ResponseWriter, name string, d *pageData, err error) {
	s.renderData(w, name, d, d, err)
}

// renderData renders data (which embeds d) with the template name.
func (s *Server) renderData(w http.ResponseWriter, name string, data any, d *pageData, err error) {
	code := http.StatusOK
	if err != nil {
		s.log.Warn("monitor: reading Redis", "page", name, "err", err)
		d.Error, d.ErrorTitle = err.Error(), troubleTitle(err)
		code = http.StatusServiceUnavailable
	}
	for _, c := range d.Campaigns {
		d.Active = d.Active || !c.Done
	}
	// A page that failed to read keeps trying, so that it recovers.
	d.Active = d.Active || err != nil
	var buf bytes.Buffer
	if err := pages.ExecuteTemplate(&buf, name, data); err != nil {
		s.log.Error("monitor: rendering", "page", name, "err", err)
		http.Error(w, "rendering failed", http.StatusInternalServerError)
		return
	}
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("X-Frame-Options", "DENY")
	h.Set("Referrer-Policy", "same-origin")
	h.Set("Content-Security-Policy", "default-src 'self'; script-src 'nonce-"+d.Nonce+"'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
	w.WriteHeader(code)
	_, _ = w.Write(buf.Bytes())
}

// when writes t short, in UTC, inside a <time> element whose datetime
// the page's script reads to add the reader's local time beside it.
func when(t, now time.Time) template.HTML {
	if t.IsZero() || t.Unix() == 0 {
		return "–"
	}
	return template.HTML(`<time datetime="` + t.UTC().Format(time.RFC3339) + `">` +
		template.HTMLEscapeString(shortTime(t, now)) + `</time>`)
}

// shortTime is t in UTC without what the reader knows already: the year
// when it is this year's. Seconds stay, as a breaker's next probe is
// often seconds away.
func shortTime(t, now time.Time) string {
	t = t.UTC()
	if t.Year() == now.UTC().Year() {
		return t.Format("Jan 2 15:04:05 UTC")
	}
	return t.Format("2006-01-02 15:04 UTC")
}

// troubleTitle says in a line why a page could not be read: Redis not
// answering is the usual cause, and says so; anything else is named as
// a failed read.
func troubleTitle(err error) string {
	var op *net.OpError
	if errors.As(err, &op) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, io.EOF) ||
		errors.Is(err, syscall.ECONNREFUSED) || strings.Contains(err.Error(), "connection refused") {
		return "Redis does not answer: nothing can be shown until it is back."
	}
	return "Reading Redis failed: nothing can be shown until it reads again."
}

// ratePer writes a rate of ep, given per second, in the period WeChat
// states its limit in: consumer funds are limited per minute (1,000/min),
// and "16.67/s" would hide that.
func ratePer(ep ratelimit.Endpoint, perSecond float64) string {
	if ratelimit.Defaults[ep].Per == time.Minute {
		return strconv.FormatFloat(perSecond*60, 'f', 1, 64) + "/min"
	}
	return strconv.FormatFloat(perSecond, 'f', 2, 64) + "/s"
}

// thousands writes n with a comma every three digits, "1,234,567", so
// that a campaign of millions reads at a glance (data attributes keep the
// plain number for machines).
func thousands(n int64) string {
	s := strconv.FormatInt(n, 10)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	if neg {
		return "-" + b.String()
	}
	return b.String()
}
