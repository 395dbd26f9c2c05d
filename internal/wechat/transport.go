package wechat

import (
	"net"
	"net/http"
	"net/url"
	"time"
)

// rewriteTransport sends requests that the SDK addressed to the production
// host to the configured base URL instead. The SDK has no base-URL option,
// and the request signature covers only method, path, query and body, so
// changing scheme and host leaves every signature valid.
type rewriteTransport struct {
	base *url.URL
	next http.RoundTripper
}

func (t *rewriteTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	r2 := r.Clone(r.Context())
	r2.URL.Scheme = t.base.Scheme
	r2.URL.Host = t.base.Host
	r2.Host = ""
	return t.next.RoundTrip(r2)
}

// newHTTPClient returns a client for a process that keeps up to concurrency
// calls in flight: idle connections are kept per host for every one of them
// (the default of 2 would open and close a TLS connection per call), and
// each phase of a call has its own deadline so that a stuck peer costs one
// timeout, not a worker slot forever.
func newHTTPClient(base *url.URL, o *options) *http.Client {
	tr := &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: o.dialTimeout, KeepAlive: 30 * time.Second}).DialContext,
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          o.concurrency * 2,
		MaxIdleConnsPerHost:   o.concurrency,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   o.dialTimeout,
		ResponseHeaderTimeout: o.requestTimeout,
		ExpectContinueTimeout: time.Second,
	}
	var rt http.RoundTripper = tr
	if base.Scheme+"://"+base.Host != DefaultBaseURL {
		rt = &rewriteTransport{base: base, next: tr}
	}
	// No Timeout: each call carries its deadline in its context (Client.call).
	return &http.Client{Transport: rt}
}
