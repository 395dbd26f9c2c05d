package sandbox

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/url"
	"time"
)

// adminRoutes registers the unsigned control API. Faults never apply here.
func (s *Server) adminRoutes(outer *http.ServeMux) {
	mux := http.NewServeMux()
	outer.Handle("/sandbox/", sameOrigin(mux))
	mux.HandleFunc("GET /sandbox/healthz", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	mux.HandleFunc("GET /sandbox/ledger", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, s.Ledger())
	})
	mux.HandleFunc("GET /sandbox/env", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = io.WriteString(w, s.EnvText())
	})
	mux.HandleFunc("GET /sandbox/stocks", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, s.Stocks())
	})
	mux.HandleFunc("POST /sandbox/stocks", func(w http.ResponseWriter, r *http.Request) {
		var spec StockSpec
		if !readJSON(w, r, &spec) {
			return
		}
		k, err := s.CreateStock(spec)
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusCreated, k)
	})
	mux.HandleFunc("GET /sandbox/stocks/{stock_id}", func(w http.ResponseWriter, r *http.Request) {
		s.writeStock(w, r.PathValue("stock_id"), nil)
	})
	mux.HandleFunc("POST /sandbox/stocks/{stock_id}/{action}", func(w http.ResponseWriter, r *http.Request) {
		id := r.PathValue("stock_id")
		var err error
		switch a := r.PathValue("action"); a {
		case "pause":
			err = s.SetStockState(id, StatePaused)
		case "activate":
			err = s.SetStockState(id, StateActive)
		case "stop":
			err = s.SetStockState(id, StateStopped)
		case "authorize":
			var body struct {
				MchID string `json:"mchid"`
			}
			if !readJSON(w, r, &body) {
				return
			}
			err = s.AuthorizeMchID(id, body.MchID)
		case "topup":
			var body struct {
				Coupons int64 `json:"coupons"`
			}
			if !readJSON(w, r, &body) {
				return
			}
			err = s.TopUp(id, body.Coupons)
		case "window":
			var body struct {
				Begin time.Time `json:"available_begin_time"`
				End   time.Time `json:"available_end_time"`
			}
			if !readJSON(w, r, &body) {
				return
			}
			err = s.SetStockWindow(id, body.Begin, body.End)
		default:
			writeJSON(w, http.StatusNotFound, map[string]string{"error": fmt.Sprintf("unknown stock action %q: want pause, activate, stop, topup, authorize or window", a)})
			return
		}
		s.writeStock(w, id, err)
	})
	mux.HandleFunc("GET /sandbox/users", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, s.Users())
	})
	mux.HandleFunc("POST /sandbox/users", func(w http.ResponseWriter, r *http.Request) {
		var u User
		if !readJSON(w, r, &u) {
			return
		}
		u, err := s.RegisterUser(u)
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusCreated, u)
	})
	mux.HandleFunc("POST /sandbox/identities", func(w http.ResponseWriter, r *http.Request) {
		// Plaintext personal data: never logged, never echoed, only its
		// salted hashes kept.
		var body struct {
			UserName     string `json:"user_name"`
			IDCardNumber string `json:"id_card_number"`
		}
		if !readJSON(w, r, &body) {
			return
		}
		if err := s.RegisterIdentity(body.UserName, body.IDCardNumber); err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusCreated, map[string]string{"status": "registered"})
	})
	mux.HandleFunc("GET /sandbox/faults", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, s.Faults())
	})
	mux.HandleFunc("PUT /sandbox/faults", func(w http.ResponseWriter, r *http.Request) {
		f := s.Faults() // absent fields keep their value
		if !readJSON(w, r, &f) {
			return
		}
		if err := f.Validate(); err != nil {
			writeError(w, err)
			return
		}
		s.SetFaults(f)
		writeJSON(w, http.StatusOK, f)
	})
	mux.HandleFunc("POST /sandbox/coupons/{coupon_id}/use", func(w http.ResponseWriter, r *http.Request) {
		var body Use
		if r.ContentLength != 0 && !readJSON(w, r, &body) {
			return
		}
		used, err := s.Use(r.PathValue("coupon_id"), body)
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, used)
	})
	mux.HandleFunc("GET /sandbox/notifications", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, s.Notifications())
	})
	mux.HandleFunc("/sandbox/", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusNotFound, map[string]string{"error": fmt.Sprintf("no admin endpoint %s %s", r.Method, r.URL.Path)})
	})
}

func (s *Server) writeStock(w http.ResponseWriter, id string, err error) {
	if err != nil {
		writeError(w, err)
		return
	}
	k, ok := s.Stock(id)
	if !ok {
		writeError(w, fmt.Errorf("stock %s: %w", id, ErrNotFound))
		return
	}
	writeJSON(w, http.StatusOK, k)
}

func readJSON(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": "invalid JSON body: " + err.Error()})
		return false
	}
	return true
}

func writeError(w http.ResponseWriter, err error) {
	status := http.StatusBadRequest
	if errors.Is(err, ErrNotFound) {
		status = http.StatusNotFound
	}
	writeJSON(w, status, map[string]string{"error": err.Error()})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

// sameOrigin refuses a change to the sandbox that a web page of another
// site could make: the admin API needs no signature, and a browser lets any
// page send a "simple" cross-site POST (a form, or fetch without CORS). A
// browser names such a request's site (Sec-Fetch-Site) and origin
// (Origin); a simple request cannot carry a JSON content type. curl and Go
// clients send neither header and are not affected.
func sameOrigin(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet || r.Method == http.MethodHead {
			next.ServeHTTP(w, r)
			return
		}
		site := r.Header.Get("Sec-Fetch-Site")
		origin := r.Header.Get("Origin")
		if site == "cross-site" || site == "same-site" {
			writeJSON(w, http.StatusForbidden, map[string]string{"error": "the admin API refuses changes from another site (Sec-Fetch-Site: " + site + ")"})
			return
		}
		if origin != "" {
			if u, err := url.Parse(origin); err != nil || u.Host != r.Host {
				writeJSON(w, http.StatusForbidden, map[string]string{"error": fmt.Sprintf("the admin API refuses changes from origin %q", origin)})
				return
			}
		}
		if r.ContentLength != 0 {
			if mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type")); mt != "application/json" {
				writeJSON(w, http.StatusUnsupportedMediaType, map[string]string{"error": fmt.Sprintf("a body must be sent as Content-Type: application/json, got %q", r.Header.Get("Content-Type"))})
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}
