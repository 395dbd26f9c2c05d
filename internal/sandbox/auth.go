package sandbox

import (
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/wechatpay-apiv3/wechatpay-go/utils"
)

const (
	authScheme = "WECHATPAY2-SHA256-RSA2048"
	clockSkew  = 5 * time.Minute
)

// authenticate checks the Authorization header as the real API does. The
// checks are ordered so that the message names the first one that failed.
func (s *Server) authenticate(r *http.Request, body []byte) *apiError {
	h := strings.TrimSpace(r.Header.Get("Authorization"))
	if h == "" {
		return errSign("missing Authorization header")
	}
	rest, ok := strings.CutPrefix(h, authScheme+" ")
	if !ok {
		return errSign("Authorization must use the " + authScheme + " scheme")
	}
	p := map[string]string{}
	for _, kv := range strings.Split(rest, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(kv), "=")
		if !ok {
			return errSign("malformed Authorization header: %q is not key=\"value\"", kv)
		}
		p[k] = strings.Trim(v, `"`)
	}
	for _, k := range []string{"mchid", "nonce_str", "timestamp", "serial_no", "signature"} {
		if p[k] == "" {
			return errSign("malformed Authorization header: %s is missing", k)
		}
	}
	if p["mchid"] != s.id.MchID {
		return &apiError{400, "MCH_NOT_EXISTS", "商户号不合法: mchid " + p["mchid"] + " does not exist"}
	}
	if p["serial_no"] != s.id.MchSerial {
		return errSign("serial_no %s is not the merchant certificate serial", p["serial_no"])
	}
	ts, err := strconv.ParseInt(p["timestamp"], 10, 64)
	if err != nil {
		return errSign("timestamp %q is not a number of seconds", p["timestamp"])
	}
	now := time.Now()
	if d := now.Sub(time.Unix(ts, 0)); d > clockSkew || d < -clockSkew {
		return errSign("timestamp %d is more than 5 minutes away from the server time", ts)
	}
	sig, err := base64.StdEncoding.DecodeString(p["signature"])
	if err != nil {
		return errSign("signature is not base64")
	}
	uri := r.RequestURI
	if !strings.HasPrefix(uri, "/") { // absolute-form request target
		uri = r.URL.RequestURI()
	}
	msg := r.Method + "\n" + uri + "\n" + p["timestamp"] + "\n" + p["nonce_str"] + "\n" + string(body) + "\n"
	sum := sha256.Sum256([]byte(msg))
	if rsa.VerifyPKCS1v15(&s.mchKey.PublicKey, crypto.SHA256, sum[:], sig) != nil {
		return errSign("signature verification failed: not signed by the merchant key, or over another method, URI, timestamp, nonce or body")
	}
	// Only a verified request may claim a nonce, or anyone could burn them.
	if !s.nonces.add(p["nonce_str"], now) {
		return errSign("nonce_str %s was already used (replayed request)", p["nonce_str"])
	}
	return nil
}

// nonceCache remembers nonces in two rotating generations, so memory stays
// bounded without a sweep. A request is accepted while its timestamp is
// within ±5 minutes, i.e. for up to 10 minutes of server time, so each
// generation lasts 10 minutes; under extreme load a full generation rotates
// early, which only shortens the memory.
type nonceCache struct {
	mu        sync.Mutex
	cur, prev map[string]struct{}
	since     time.Time
	period    time.Duration
	max       int
}

func newNonceCache() *nonceCache {
	return &nonceCache{cur: map[string]struct{}{}, period: 2 * clockSkew, max: 1 << 20, since: time.Now()}
}

func (c *nonceCache) add(nonce string, now time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if now.Sub(c.since) >= c.period || len(c.cur) >= c.max {
		c.prev, c.cur, c.since = c.cur, make(map[string]struct{}, len(c.cur)), now
	}
	if _, ok := c.cur[nonce]; ok {
		return false
	}
	if _, ok := c.prev[nonce]; ok {
		return false
	}
	c.cur[nonce] = struct{}{}
	return true
}

// writeSigned answers an API request with the headers the SDK validates.
// Signing is the main CPU cost, so it never runs under a lock.
func (s *Server) writeSigned(w http.ResponseWriter, status int, body []byte, badSignature bool) {
	ts := strconv.FormatInt(time.Now().Unix(), 10)
	nonce, _ := utils.GenerateNonce()
	msg := ts + "\n" + nonce + "\n" + string(body) + "\n"
	if badSignature {
		msg += "tampered" // a well-formed signature over another message
	}
	sig, err := utils.SignSHA256WithRSA(msg, s.wxKey)
	if err != nil {
		s.log.Error("sign response", "err", err)
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Request-Id", s.requestID())
	h.Set("Wechatpay-Serial", s.id.PublicKeyID)
	h.Set("Wechatpay-Timestamp", ts)
	h.Set("Wechatpay-Nonce", nonce)
	h.Set("Wechatpay-Signature", sig)
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

func (s *Server) requestID() string {
	return fmt.Sprintf("%s%08X", s.bootID, s.reqSeq.Add(1))
}
