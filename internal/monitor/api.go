package monitor

import (
	"encoding/csv"
	"encoding/json"
	"net/http"

	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/tasks"
)

// CampaignList is the answer of GET /api/campaigns.
type CampaignList struct {
	Campaigns []Campaign `json:"campaigns"`
	Merchants []Merchant `json:"merchants"`
}

// CampaignDetail is the answer of GET /api/campaigns/{name}: the campaign
// and its merchant's shared rate and open breakers.
type CampaignDetail struct {
	Campaign
	Merchant Merchant `json:"merchant"`
}

func (s *Server) apiCampaigns(w http.ResponseWriter, r *http.Request) {
	cs, err := s.campaigns(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	ms, err := s.merchants(r.Context(), cs)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, CampaignList{Campaigns: cs, Merchants: ms})
}

func (s *Server) apiCampaign(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	c, ok, err := s.campaign(r.Context(), name, true)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	if !ok {
		writeJSON(w, http.StatusNotFound, map[string]string{"error": "no campaign " + name})
		return
	}
	m, err := s.merchant(r.Context(), c.MchID)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, CampaignDetail{Campaign: c, Merchant: holding(m, c)})
}

// apiReport streams the report as enqueuer report writes it. A failure
// midway aborts the response, so that a truncated file cannot pass for a
// whole one.
func (s *Server) apiReport(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	var meta idempotency.Campaign
	var err error
	if tasks.ValidateCampaign(name) == nil {
		if meta, err = s.store.Campaign(r.Context(), name); err != nil {
			s.fail(w, r, err)
			return
		}
	}
	if meta.Name == "" {
		writeJSON(w, http.StatusNotFound, map[string]string{"error": "no campaign " + name})
		return
	}
	// ?state=failed (repeatable) keeps only the sends in those states, so
	// that the failed or held ones of a large campaign come without the
	// rest.
	var only map[idempotency.State]bool
	if states := r.URL.Query()["state"]; len(states) > 0 {
		only = map[idempotency.State]bool{}
		for _, st := range states {
			if !validState(st) {
				writeJSON(w, http.StatusBadRequest, map[string]string{"error": "no state " + st})
				return
			}
			only[idempotency.State(st)] = true
		}
	}
	file := safeFilename(name) + "-report.csv"
	if len(only) == 1 {
		for st := range only {
			file = safeFilename(name) + "-" + string(st) + ".csv"
		}
	}
	h := w.Header()
	h.Set("Content-Type", "text/csv; charset=utf-8")
	h.Set("Content-Disposition", `attachment; filename="`+file+`"`)
	h.Set("Cache-Control", "no-store")
	h.Set("X-Content-Type-Options", "nosniff")
	cw := csv.NewWriter(w)
	_ = cw.Write(idempotency.ReportHeaderWithRedemptions)
	rc := http.NewResponseController(w)
	n := 0
	err = s.store.Each(r.Context(), name, func(rec idempotency.Record) error {
		if only != nil && !only[rec.State] {
			return nil
		}
		if err := cw.Write(rec.ReportRowWithRedemption()); err != nil {
			return err
		}
		if n++; n%1000 == 0 {
			cw.Flush()
			_ = rc.Flush()
			return cw.Error()
		}
		return nil
	})
	cw.Flush()
	if err == nil {
		err = cw.Error()
	}
	if err != nil {
		s.log.Warn("monitor: report aborted", "campaign", name, "rows", n, "err", err)
		panic(http.ErrAbortHandler)
	}
}

func validState(s string) bool {
	for _, st := range idempotency.States {
		if string(st) == s {
			return true
		}
	}
	return false
}

// safeFilename keeps a campaign name (letters, digits, '_', '.', '-') as
// it is and replaces anything else.
func safeFilename(name string) string {
	b := []byte(name)
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '.' || c == '-') {
			b[i] = '_'
		}
	}
	return string(b)
}

func (s *Server) fail(w http.ResponseWriter, r *http.Request, err error) {
	s.log.Warn("monitor: reading Redis", "path", r.URL.Path, "err", err)
	writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": err.Error()})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}
