package sandbox

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"time"

	"golang.org/x/time/rate"
)

// Faults are failures injected into API requests, never into the admin API.
// Every rate is a probability in [0, 1]: 1 always applies, 0 never.
type Faults struct {
	// RateLimit caps API requests per second across all callers (0 = none);
	// the excess gets 429 FREQUENCY_LIMIT_EXCEED.
	RateLimit float64 `json:"rate_limit"`
	// ErrorRate answers 500 SYSTEM_ERROR before anything is committed.
	ErrorRate float64 `json:"error_rate"`
	// Latency is added before answering, with probability LatencyRate
	// (treated as 1 when Latency > 0 and LatencyRate is 0).
	Latency     time.Duration `json:"latency"`
	LatencyRate float64       `json:"latency_rate"`
	// CommitFailRate issues the coupon, then fails the answer according to
	// CommitFailMode: "500" (SYSTEM_ERROR), "drop" (connection closed without
	// a response) or "" (either, at random).
	CommitFailRate float64 `json:"commit_fail_rate"`
	CommitFailMode string  `json:"commit_fail_mode"`
	// BadSignatureRate answers a 2xx whose Wechatpay-Signature is wrong.
	BadSignatureRate float64 `json:"bad_signature_rate"`

	// The profiles below are failures merchants report of the real API.

	// RateLimitAnswer is how the excess over RateLimit is refused:
	// "429" (429 FREQUENCY_LIMIT_EXCEED, the default), "invalid_request"
	// (400 INVALID_REQUEST 调用频率过高) or "frequency_limited" (403
	// FREQUENCY_LIMITED). Merchants see all three.
	RateLimitAnswer string `json:"rate_limit_answer"`
	// AcceptedRate issues a send, then answers 202 with no body: WeChat's
	// way of asking for the same request again.
	AcceptedRate float64 `json:"accepted_rate"`
	// UserConflict refuses a send to an openid while another send to the
	// same openid is in flight with a false 403 REQUEST_BLOCKED
	// 用户被限领拦截; sent one at a time, both would succeed.
	UserConflict bool `json:"user_conflict"`
	// MonthlyCapPerUser refuses an openid's sends once it holds this many
	// coupons issued in the current month, China time, of any stock, with
	// 400 INVALID_REQUEST 暂时无法领取 (0 = no cap): WeChat's own limit on
	// one user, final for that user this month.
	MonthlyCapPerUser int64 `json:"monthly_cap_per_user"`
	// SignError refuses every API request with 401 SIGN_ERROR, as WeChat
	// does when the merchant's clock is off or its key or serial is wrong.
	SignError bool `json:"sign_error"`

	// COUPON.USE notifications (POST /sandbox/coupons/{id}/use).

	// NotifyDuplicateRate sends an acknowledged notification once more:
	// WeChat says the same notification may come more than once.
	NotifyDuplicateRate float64 `json:"notify_duplicate_rate"`
	// NotifyDelayMS delays a notification's first delivery, and
	// NotifyJitterMS adds a random 0..NotifyJitterMS to it, so that
	// notifications arrive out of the order of their coupons' use.
	NotifyDelayMS  int64 `json:"notify_delay_ms"`
	NotifyJitterMS int64 `json:"notify_jitter_ms"`
}

// How the excess over RateLimit is refused (Faults.RateLimitAnswer).
const (
	RateLimit429              = "429"
	RateLimitInvalidRequest   = "invalid_request"
	RateLimitFrequencyLimited = "frequency_limited"
)

// Commit-fail modes.
const (
	CommitFail500  = "500"
	CommitFailDrop = "drop"
)

type faultsAlias Faults

// MarshalJSON writes Latency as a duration string such as "50ms".
func (f Faults) MarshalJSON() ([]byte, error) {
	return json.Marshal(struct {
		faultsAlias
		Latency string `json:"latency"`
	}{faultsAlias(f), f.Latency.String()})
}

// UnmarshalJSON updates only the fields present, so a partial object can be
// applied on top of the current faults. Latency is a duration string ("50ms")
// or a number of nanoseconds.
func (f *Faults) UnmarshalJSON(b []byte) error {
	aux := struct {
		*faultsAlias
		Latency json.RawMessage `json:"latency"`
	}{faultsAlias: (*faultsAlias)(f)}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&aux); err != nil {
		return err
	}
	if len(aux.Latency) == 0 || string(aux.Latency) == "null" {
		return nil
	}
	var s string
	if err := json.Unmarshal(aux.Latency, &s); err != nil {
		n, err := strconv.ParseInt(string(aux.Latency), 10, 64)
		if err != nil {
			return fmt.Errorf("latency: want a duration string like \"50ms\", got %s", aux.Latency)
		}
		f.Latency = time.Duration(n)
		return nil
	}
	if s == "" {
		f.Latency = 0
		return nil
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("latency: %w", err)
	}
	f.Latency = d
	return nil
}

// Validate reports the first invalid field, by its JSON name.
func (f Faults) Validate() error {
	for _, p := range []struct {
		name string
		v    float64
	}{
		{"error_rate", f.ErrorRate},
		{"latency_rate", f.LatencyRate},
		{"commit_fail_rate", f.CommitFailRate},
		{"bad_signature_rate", f.BadSignatureRate},
		{"accepted_rate", f.AcceptedRate},
		{"notify_duplicate_rate", f.NotifyDuplicateRate},
	} {
		if !(p.v >= 0 && p.v <= 1) {
			return fmt.Errorf("%s must be a probability in [0, 1], got %v", p.name, p.v)
		}
	}
	if !(f.RateLimit >= 0) || math.IsInf(f.RateLimit, 0) {
		return fmt.Errorf("rate_limit must be a finite number >= 0, got %v", f.RateLimit)
	}
	if f.Latency < 0 {
		return fmt.Errorf("latency must be >= 0, got %v", f.Latency)
	}
	switch f.CommitFailMode {
	case "", CommitFail500, CommitFailDrop:
	default:
		return fmt.Errorf("commit_fail_mode must be %q, %q or empty, got %q", CommitFail500, CommitFailDrop, f.CommitFailMode)
	}
	switch f.RateLimitAnswer {
	case "", RateLimit429, RateLimitInvalidRequest, RateLimitFrequencyLimited:
	default:
		return fmt.Errorf("rate_limit_answer must be %q, %q or %q, got %q", RateLimit429, RateLimitInvalidRequest, RateLimitFrequencyLimited, f.RateLimitAnswer)
	}
	if f.NotifyDelayMS < 0 || f.NotifyJitterMS < 0 {
		return fmt.Errorf("notify_delay_ms and notify_jitter_ms must be >= 0, got %d and %d", f.NotifyDelayMS, f.NotifyJitterMS)
	}
	if f.MonthlyCapPerUser < 0 {
		return fmt.Errorf("monthly_cap_per_user must be >= 0 (0 = no cap), got %d", f.MonthlyCapPerUser)
	}
	return nil
}

// rateLimited is the answer to a request over RateLimit.
func (f Faults) rateLimited() *apiError {
	switch f.RateLimitAnswer {
	case RateLimitInvalidRequest:
		return errInvalid("调用频率过高，请稍后再试: over the sandbox rate limit of %g requests/s", f.RateLimit)
	case RateLimitFrequencyLimited:
		return &apiError{403, "FREQUENCY_LIMITED", fmt.Sprintf("频率限制: over the sandbox rate limit of %g requests/s", f.RateLimit)}
	}
	return &apiError{429, "FREQUENCY_LIMIT_EXCEED", fmt.Sprintf("接口限频: over the sandbox rate limit of %g requests/s", f.RateLimit)}
}

func (f Faults) latencyRate() float64 {
	if f.Latency > 0 && f.LatencyRate == 0 {
		return 1
	}
	return f.LatencyRate
}

// Faults returns the faults in force.
func (s *Server) Faults() Faults { return *s.faults.Load() }

// SetFaults replaces the faults in force. Values are not validated here
// (see Faults.Validate); out-of-range rates behave as 0 or 1.
func (s *Server) SetFaults(f Faults) {
	s.faults.Store(&f)
	// A fresh bucket (full, burst of one second's worth) rather than retuning
	// the old one, whose state under rate.Inf is meaningless.
	var lim *rate.Limiter
	if f.RateLimit > 0 {
		lim = rate.NewLimiter(rate.Limit(f.RateLimit), max(1, int(math.Ceil(f.RateLimit))))
	}
	s.limiter.Store(lim)
}

func (s *Server) allow() bool {
	lim := s.limiter.Load()
	return lim == nil || lim.Allow()
}

// roll reports whether an event of probability p happens.
func (s *Server) roll(p float64) bool {
	if p <= 0 {
		return false
	}
	if p >= 1 {
		return true
	}
	s.rngMu.Lock()
	defer s.rngMu.Unlock()
	return s.rng.Float64() < p
}
