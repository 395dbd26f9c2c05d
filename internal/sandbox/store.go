package sandbox

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"math"
	"os"
	"slices"
	"strconv"
	"time"
)

// Stock kinds and states.
const (
	KindFavor    = "favor"    // cash coupons, /v3/marketing/favor/users/{openid}/coupons
	KindMultiuse = "multiuse" // consumer funds, /v3/multiuse/users/{openid}/coupons

	StateActive  = "active"
	StatePaused  = "paused"
	StateStopped = "stopped"
)

// Coupon statuses, as the list API spells them.
const (
	StatusSended = "SENDED"
	StatusUsed   = "USED"
)

// ErrNotFound is wrapped by errors about unknown stocks and coupons.
var ErrNotFound = errors.New("not found")

// StockSpec describes a stock to create. Zero fields take defaults.
type StockSpec struct {
	ID         string `json:"stock_id,omitempty"` // numeric, generated when empty
	Kind       string `json:"kind,omitempty"`     // KindFavor (default) or KindMultiuse
	Name       string `json:"name,omitempty"`
	Budget     int64  `json:"budget"`       // coupons that may be issued, > 0
	MaxPerUser int64  `json:"max_per_user"` // per openid, 0 = unlimited
	// CouponValue and CouponMinimum are in fen. A cash coupon defaults to
	// 100 off a minimum of CouponValue; for a consumer fund CouponValue is the
	// largest amount one send may carry (default 100000).
	CouponValue   int64  `json:"coupon_value"`
	CouponMinimum int64  `json:"coupon_minimum"`
	CreatorMchID  string `json:"creator_mchid,omitempty"` // default: the sandbox's mchid
	State         string `json:"state,omitempty"`         // StateActive (default), StatePaused, StateStopped
	// MaxAmountByDay caps the fen issued per day, China time (WeChat's
	// max_amount_by_day; 0 = none): beyond it sends get NOT_ENOUGH until
	// 00:00 CST.
	MaxAmountByDay int64 `json:"max_amount_by_day,omitempty"`
	// FixedValue (cash coupons only) sets the stock up for 指定面额发券:
	// every send must name its coupon_value and coupon_minimum, and only
	// such a stock accepts them. WeChat's docs say the two fields are for
	// that scenario only (其他场景不需要填); on any other stock they are
	// refused, so a client cannot issue a value the stock was not made for.
	FixedValue bool `json:"fixed_value,omitempty"`
	// FixedAmount (consumer funds only): CouponValue is the amount of
	// every send, so a send may leave amount out; an amount it does give
	// must equal CouponValue. Without it amount is required and
	// CouponValue is its maximum.
	FixedAmount bool `json:"fixed_amount,omitempty"`
	// AuthorizedMchIDs may send a stock created by another merchant
	// (CreatorMchID). The sandbox sends as its own mchid, so a stock of
	// another creator is refused (批次不支持跨商户发券) unless that mchid is
	// listed here.
	AuthorizedMchIDs []string `json:"authorized_mchids,omitempty"`
	// AvailableBegin and AvailableEnd are the stock's window (WeChat's
	// available_begin_time, available_end_time): a send outside it is
	// refused like a paused stock's (活动已结束或未激活). Zero takes the
	// default: from a day before creation to 30 days after it.
	AvailableBegin time.Time `json:"available_begin_time,omitzero"`
	AvailableEnd   time.Time `json:"available_end_time,omitzero"`
}

// Stock is a stock and how much of it has been issued.
type Stock struct {
	StockSpec
	Issued    int64 `json:"issued"`
	Remaining int64 `json:"remaining"`
	// Created is the query API's create_time and start_time (the sandbox
	// activates a stock when it creates it); Stopped is its stop_time,
	// set when the stock is stopped.
	Created time.Time `json:"create_time,omitzero"`
	Stopped time.Time `json:"stop_time,omitzero"`
	// Day (China time, 2006-01-02) and AmountToday: fen issued that day,
	// for MaxAmountByDay.
	Day         string `json:"day,omitempty"`
	AmountToday int64  `json:"amount_today,omitempty"`
}

// coupon is one issued coupon or consumer fund. ReqValue and ReqMinimum are
// what the send carried (0 = absent), kept to judge idempotent retries.
// Records never change once issued (use is kept apart), so a snapshot can
// share them and encode them outside the lock.
type coupon struct {
	ID           string    `json:"coupon_id"`
	Kind         string    `json:"kind"`
	StockID      string    `json:"stock_id"`
	OpenID       string    `json:"openid"`
	OutRequestNo string    `json:"out_request_no"`
	SenderMchID  string    `json:"sender_mchid"`
	AppID        string    `json:"appid"`
	CreatorMchID string    `json:"creator_mchid,omitempty"` // as sent (favor)
	ReqValue     int64     `json:"req_value,omitempty"`
	ReqMinimum   int64     `json:"req_minimum,omitempty"`
	CardType     string    `json:"card_type,omitempty"`
	Holder       string    `json:"holder,omitempty"` // salted hash of name and id number
	Amount       int64     `json:"amount"`
	Minimum      int64     `json:"minimum"`
	Created      time.Time `json:"create_time"`
}

// usage is how a coupon was consumed (MarkUsed).
type usage struct {
	Time          time.Time `json:"consume_time"`
	MchID         string    `json:"consume_mchid"`
	TransactionID string    `json:"transaction_id"`
}

func (c *coupon) sameRequest(o *coupon) bool {
	return c.Kind == o.Kind && c.OpenID == o.OpenID && c.StockID == o.StockID && c.AppID == o.AppID &&
		c.CreatorMchID == o.CreatorMchID && c.ReqValue == o.ReqValue && c.ReqMinimum == o.ReqMinimum &&
		c.CardType == o.CardType && c.Holder == o.Holder
}

// store is the sandbox's state; Server.mu guards it.
type store struct {
	stocks     map[string]*Stock
	stockOrder []string
	coupons    []*coupon // issue order
	byID       map[string]*coupon
	byOpenID   map[string][]*coupon
	byRequest  map[string]*coupon  // sender mchid + "\x00" + out_request_no
	perUser    map[string]int64    // stock id + "\x00" + openid
	used       map[string]usage    // by coupon id
	callbacks  map[string]callback // notification URLs by mchid
	users      map[string]User     // by openid: registered users only
	// identities maps the salted hash of a registered id number to the
	// salted hash of it with its name (identityKey, identityBinding).
	identities map[string]string
	requests   map[string]int64
	faults     map[string]int64
	nextCoupon int64
	nextStock  int64
	dirty      bool
}

func newStore() *store {
	return &store{
		stocks:     map[string]*Stock{},
		byID:       map[string]*coupon{},
		byOpenID:   map[string][]*coupon{},
		byRequest:  map[string]*coupon{},
		perUser:    map[string]int64{},
		used:       map[string]usage{},
		callbacks:  map[string]callback{},
		users:      map[string]User{},
		identities: map[string]string{},
		requests:   map[string]int64{},
		faults:     map[string]int64{},
		nextCoupon: 10000000000,
		nextStock:  16000001,
	}
}

func (st *store) addCoupon(c *coupon) {
	st.coupons = append(st.coupons, c)
	st.byID[c.ID] = c
	st.byOpenID[c.OpenID] = append(st.byOpenID[c.OpenID], c)
	st.byRequest[c.SenderMchID+"\x00"+c.OutRequestNo] = c
	st.perUser[c.StockID+"\x00"+c.OpenID]++
}

func (st *store) addStock(k *Stock) {
	st.stocks[k.ID] = k
	st.stockOrder = append(st.stockOrder, k.ID)
}

func (k *Stock) view() Stock {
	v := *k
	v.AuthorizedMchIDs = slices.Clone(k.AuthorizedMchIDs)
	v.Remaining = max(0, v.Budget-v.Issued)
	return v
}

func (st *store) status(c *coupon) string {
	if _, ok := st.used[c.ID]; ok {
		return StatusUsed
	}
	return StatusSended
}

// snapshot is state.json.
type snapshot struct {
	NextCouponID int64            `json:"next_coupon_id"`
	NextStockID  int64            `json:"next_stock_id"`
	Stocks       []Stock          `json:"stocks"`
	Coupons      []*coupon        `json:"coupons"`
	Used         map[string]usage `json:"used"`
	Users        []User           `json:"users,omitempty"`
	// Identities holds salted hashes only: never a name or an id number.
	Identities map[string]string `json:"identities,omitempty"`
	Requests   map[string]int64  `json:"requests"`
	Faults     map[string]int64  `json:"faults"`
	// Callbacks are the merchants' notification URLs.
	Callbacks map[string]callback `json:"callbacks,omitempty"`
}

func (st *store) snapshot() snapshot {
	sn := snapshot{
		NextCouponID: st.nextCoupon,
		NextStockID:  st.nextStock,
		Stocks:       make([]Stock, 0, len(st.stockOrder)),
		Coupons:      slices.Clip(st.coupons), // shared: records never change, the store only appends
		Used:         maps.Clone(st.used),
		Users:        st.userList(),
		Identities:   maps.Clone(st.identities),
		Requests:     maps.Clone(st.requests),
		Faults:       maps.Clone(st.faults),
		Callbacks:    maps.Clone(st.callbacks),
	}
	for _, id := range st.stockOrder {
		sn.Stocks = append(sn.Stocks, st.stocks[id].view())
	}
	return sn
}

func (s *Server) loadState() error {
	if s.dir == "" {
		return nil
	}
	b, err := os.ReadFile(s.path(StateFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var sn snapshot
	if err := json.Unmarshal(b, &sn); err != nil {
		return fmt.Errorf("%s: %w", s.path(StateFile), err)
	}
	st := newStore()
	st.nextCoupon = max(st.nextCoupon, sn.NextCouponID)
	st.nextStock = max(st.nextStock, sn.NextStockID)
	now := s.now()
	for _, k := range sn.Stocks {
		// A state.json from before stocks had a window: the default one,
		// from now.
		k.AvailableBegin, k.AvailableEnd = defaultWindow(k.AvailableBegin, k.AvailableEnd, now)
		k.Created = cmp.Or(k.Created, now)
		st.addStock(&k)
	}
	for _, c := range sn.Coupons {
		st.addCoupon(c)
		if n, err := strconv.ParseInt(c.ID, 10, 64); err == nil && n >= st.nextCoupon {
			st.nextCoupon = n + 1
		}
	}
	maps.Copy(st.used, sn.Used)
	for _, u := range sn.Users {
		st.users[u.OpenID] = u
	}
	maps.Copy(st.identities, sn.Identities)
	maps.Copy(st.requests, sn.Requests)
	maps.Copy(st.faults, sn.Faults)
	maps.Copy(st.callbacks, sn.Callbacks)
	s.st = st
	return nil
}

// save writes state.json if anything changed since the last save. The
// snapshot is copied under the lock and encoded outside it.
func (s *Server) save() error {
	if s.dir == "" {
		return nil
	}
	s.saveMu.Lock()
	defer s.saveMu.Unlock()
	s.mu.Lock()
	if !s.st.dirty {
		s.mu.Unlock()
		return nil
	}
	sn := s.st.snapshot()
	s.st.dirty = false
	s.mu.Unlock()

	b, err := json.Marshal(sn)
	if err == nil {
		err = writeFileAtomic(s.path(StateFile), b, 0o600)
	}
	if err != nil {
		s.mu.Lock()
		s.st.dirty = true
		s.mu.Unlock()
		return fmt.Errorf("save %s: %w", s.path(StateFile), err)
	}
	return nil
}

// saveLoop saves at most every second, and spaces saves to ten times their
// duration so that encoding a large ledger never takes over a benchmark.
func (s *Server) saveLoop() {
	defer close(s.saverDone)
	t := time.NewTimer(time.Second)
	defer t.Stop()
	for {
		select {
		case <-s.stopSaver:
			return
		case <-t.C:
			start := time.Now()
			if err := s.save(); err != nil {
				s.log.Error("persist state", "err", err)
			}
			t.Reset(max(time.Second, 10*time.Since(start)))
		}
	}
}

// CreateStock adds a stock; zero fields of spec take their defaults.
func (s *Server) CreateStock(spec StockSpec) (Stock, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.createStockLocked(spec)
}

func (s *Server) createStockLocked(spec StockSpec) (Stock, error) {
	if spec.Kind == "" {
		spec.Kind = KindFavor
	}
	if spec.State == "" {
		spec.State = StateActive
	}
	if spec.CreatorMchID == "" {
		spec.CreatorMchID = s.id.MchID
	}
	switch spec.Kind {
	case KindFavor:
		spec.Name = cmp.Or(spec.Name, "沙箱代金券")
		spec.CouponValue = cmp.Or(spec.CouponValue, 100)
		spec.CouponMinimum = cmp.Or(spec.CouponMinimum, spec.CouponValue)
	case KindMultiuse:
		spec.Name = cmp.Or(spec.Name, "沙箱消费金")
		spec.CouponValue = cmp.Or(spec.CouponValue, 100000)
	default:
		return Stock{}, fmt.Errorf("kind must be %q or %q, got %q", KindFavor, KindMultiuse, spec.Kind)
	}
	switch {
	case spec.Budget <= 0:
		return Stock{}, fmt.Errorf("budget must be > 0, got %d", spec.Budget)
	case spec.MaxPerUser < 0:
		return Stock{}, fmt.Errorf("max_per_user must be >= 0 (0 = unlimited), got %d", spec.MaxPerUser)
	case spec.CouponValue <= 0:
		return Stock{}, fmt.Errorf("coupon_value must be > 0, got %d", spec.CouponValue)
	case spec.Kind == KindFavor && spec.CouponMinimum < spec.CouponValue:
		return Stock{}, fmt.Errorf("coupon_minimum must be >= coupon_value (%d), got %d", spec.CouponValue, spec.CouponMinimum)
	case spec.MaxAmountByDay < 0:
		return Stock{}, fmt.Errorf("max_amount_by_day must be >= 0 (0 = no daily cap), got %d", spec.MaxAmountByDay)
	case !validState(spec.State):
		return Stock{}, fmt.Errorf("state must be %q, %q or %q, got %q", StateActive, StatePaused, StateStopped, spec.State)
	case len(spec.CreatorMchID) > 20:
		return Stock{}, fmt.Errorf("creator_mchid must be at most 20 characters")
	case spec.FixedValue && spec.Kind != KindFavor:
		return Stock{}, fmt.Errorf("fixed_value (指定面额发券) is for %s stocks; a %s stock with one amount per send is fixed_amount", KindFavor, spec.Kind)
	case spec.FixedAmount && spec.Kind != KindMultiuse:
		return Stock{}, fmt.Errorf("fixed_amount is for %s stocks; a %s stock whose sends name their value is fixed_value", KindMultiuse, spec.Kind)
	}
	for _, m := range spec.AuthorizedMchIDs {
		if err := checkMchID("authorized_mchids", m); err != nil {
			return Stock{}, err
		}
	}
	spec.AuthorizedMchIDs = slices.Clone(spec.AuthorizedMchIDs)
	now := s.now()
	spec.AvailableBegin, spec.AvailableEnd = defaultWindow(spec.AvailableBegin, spec.AvailableEnd, now)
	if err := checkWindow(spec.AvailableBegin, spec.AvailableEnd); err != nil {
		return Stock{}, err
	}
	if spec.ID == "" {
		for spec.ID == "" || s.st.stocks[spec.ID] != nil {
			spec.ID = strconv.FormatInt(s.st.nextStock, 10)
			s.st.nextStock++
		}
	} else if !isDigits(spec.ID) || len(spec.ID) > 20 {
		return Stock{}, fmt.Errorf("stock_id must be 1 to 20 digits, got %q", spec.ID)
	} else if s.st.stocks[spec.ID] != nil {
		return Stock{}, fmt.Errorf("stock_id %s already exists", spec.ID)
	}
	k := &Stock{StockSpec: spec, Created: now}
	s.st.addStock(k)
	s.st.dirty = true
	return k.view(), nil
}

// Default stock windows: the day before creation, so that a stock is
// active at once even on a clock a little behind, to 30 days after it.
const (
	DefaultWindowBefore = 24 * time.Hour
	DefaultWindowAfter  = 30 * 24 * time.Hour
)

func defaultWindow(begin, end, now time.Time) (time.Time, time.Time) {
	if begin.IsZero() {
		begin = now.Add(-DefaultWindowBefore)
	}
	if end.IsZero() {
		end = now.Add(DefaultWindowAfter)
	}
	return begin, end
}

func checkWindow(begin, end time.Time) error {
	if !end.After(begin) {
		return fmt.Errorf("available_end_time %s must be after available_begin_time %s", rfc3339(end), rfc3339(begin))
	}
	return nil
}

// SetStockWindow sets a stock's available_begin_time and
// available_end_time; a zero time keeps that end as it is.
func (s *Server) SetStockWindow(id string, begin, end time.Time) error {
	return s.updateStock(id, func(k *Stock) error {
		b, e := cmp.Or(begin, k.AvailableBegin), cmp.Or(end, k.AvailableEnd)
		if err := checkWindow(b, e); err != nil {
			return err
		}
		k.AvailableBegin, k.AvailableEnd = b, e
		return nil
	})
}

func checkMchID(field, v string) error {
	if !isDigits(v) || len(v) > 20 {
		return fmt.Errorf("%s: a mchid must be 1 to 20 digits, got %q", field, v)
	}
	return nil
}

// AuthorizeMchID lets mchid send a stock created by another merchant, as
// the creator does on WeChat's merchant platform.
func (s *Server) AuthorizeMchID(stockID, mchid string) error {
	if err := checkMchID("mchid", mchid); err != nil {
		return err
	}
	return s.updateStock(stockID, func(k *Stock) error {
		if !slices.Contains(k.AuthorizedMchIDs, mchid) {
			// A new slice: views handed out earlier share the old one.
			k.AuthorizedMchIDs = append(slices.Clip(k.AuthorizedMchIDs), mchid)
		}
		return nil
	})
}

func validState(v string) bool { return v == StateActive || v == StatePaused || v == StateStopped }

func isDigits(v string) bool {
	for _, r := range v {
		if r < '0' || r > '9' {
			return false
		}
	}
	return v != ""
}

// Stock returns a stock by id.
func (s *Server) Stock(id string) (Stock, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if k := s.st.stocks[id]; k != nil {
		return k.view(), true
	}
	return Stock{}, false
}

// Stocks returns all stocks in creation order.
func (s *Server) Stocks() []Stock {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Stock, 0, len(s.st.stockOrder))
	for _, id := range s.st.stockOrder {
		out = append(out, s.st.stocks[id].view())
	}
	return out
}

// SetStockState moves a stock to StateActive, StatePaused or StateStopped.
func (s *Server) SetStockState(id, state string) error {
	if !validState(state) {
		return fmt.Errorf("state must be %q, %q or %q, got %q", StateActive, StatePaused, StateStopped, state)
	}
	return s.updateStock(id, func(k *Stock) error {
		if state == StateStopped && k.State != StateStopped {
			k.Stopped = s.now()
		} else if state != StateStopped {
			k.Stopped = time.Time{}
		}
		k.State = state
		return nil
	})
}

// TopUp adds n coupons to a stock's budget.
func (s *Server) TopUp(id string, n int64) error {
	if n <= 0 {
		return fmt.Errorf("coupons must be > 0, got %d", n)
	}
	return s.updateStock(id, func(k *Stock) error {
		if k.Budget > math.MaxInt64-n {
			return fmt.Errorf("coupons %d would overflow stock %s's budget of %d", n, id, k.Budget)
		}
		k.Budget += n
		return nil
	})
}

func (s *Server) updateStock(id string, f func(*Stock) error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	k := s.st.stocks[id]
	if k == nil {
		return fmt.Errorf("stock %s: %w", id, ErrNotFound)
	}
	if err := f(k); err != nil {
		return err
	}
	s.st.dirty = true
	return nil
}

// MarkUsed marks a coupon USED, as if a payment had consumed it, so that the
// list API shows its consume_information. Empty arguments take defaults: the
// sandbox's mchid and a generated transaction id.
func (s *Server) MarkUsed(couponID, consumeMchID, transactionID string) error {
	_, err := s.Use(couponID, Use{ConsumeMchID: consumeMchID, TransactionID: transactionID})
	return err
}

// Use is how a coupon is used (POST /sandbox/coupons/{id}/use); empty
// fields take defaults: now, the sandbox's mchid, a generated transaction id.
type Use struct {
	ConsumeTime   time.Time `json:"consume_time"`
	ConsumeMchID  string    `json:"consume_mchid"`
	TransactionID string    `json:"transaction_id"`
}

// Used is what Use did.
type Used struct {
	CouponID      string `json:"coupon_id"`
	Status        string `json:"status"`
	ConsumeTime   string `json:"consume_time"`
	ConsumeMchID  string `json:"consume_mchid"`
	TransactionID string `json:"transaction_id"`
	Amount        int64  `json:"coupon_amount"`
	// NotificationID is the COUPON.USE notification queued for the stock
	// creator's notify_url, "" when it has set none.
	NotificationID string `json:"notification_id,omitempty"`
}

// Use marks a coupon USED and queues its COUPON.USE notification to the
// notification URL of the stock's creator, if one is set.
func (s *Server) Use(couponID string, u Use) (Used, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.st.byID[couponID]
	if c == nil {
		return Used{}, fmt.Errorf("coupon %s: %w", couponID, ErrNotFound)
	}
	if _, ok := s.st.used[couponID]; ok {
		return Used{}, fmt.Errorf("coupon %s is already used", couponID)
	}
	now := time.Now()
	if u.ConsumeTime.IsZero() {
		u.ConsumeTime = now
	}
	use := usage{
		Time:          u.ConsumeTime,
		MchID:         cmp.Or(u.ConsumeMchID, s.id.MchID),
		TransactionID: cmp.Or(u.TransactionID, "42000"+now.Format("20060102")+randDigits(15)),
	}
	s.st.used[couponID] = use
	s.st.dirty = true
	id := s.notifyUsedLocked(c, use)
	return Used{CouponID: couponID, Status: StatusUsed, ConsumeTime: rfc3339(use.Time), ConsumeMchID: use.MchID,
		TransactionID: use.TransactionID, Amount: c.Amount, NotificationID: id}, nil
}

// Ledger is everything the sandbox has issued and answered: the same JSON as
// GET /sandbox/ledger.
type Ledger struct {
	Coupons []LedgerCoupon `json:"coupons"` // in issue order
	// Requests counts API requests by "<http status> <code>": "200 OK",
	// "429 FREQUENCY_LIMIT_EXCEED", "0 CONNECTION_DROPPED"…
	Requests map[string]int64 `json:"requests"`
	// Faults counts injected faults: commit_fail_500, commit_fail_drop,
	// bad_signature, latency, system_error.
	Faults map[string]int64 `json:"faults"`
}

// LedgerCoupon is one issued coupon.
type LedgerCoupon struct {
	OutRequestNo string `json:"out_request_no"`
	OpenID       string `json:"openid"`
	StockID      string `json:"stock_id"`
	CouponID     string `json:"coupon_id"`
	CreateTime   string `json:"create_time"` // RFC 3339, +08:00
	Kind         string `json:"kind"`        // KindFavor or KindMultiuse
	Status       string `json:"status"`      // SENDED or USED
}

// Ledger returns a copy of the ledger.
func (s *Server) Ledger() Ledger {
	s.mu.Lock()
	defer s.mu.Unlock()
	l := Ledger{
		Coupons:  make([]LedgerCoupon, len(s.st.coupons)),
		Requests: maps.Clone(s.st.requests),
		Faults:   maps.Clone(s.st.faults),
	}
	for i, c := range s.st.coupons {
		l.Coupons[i] = LedgerCoupon{c.OutRequestNo, c.OpenID, c.StockID, c.ID, rfc3339(c.Created), c.Kind, s.st.status(c)}
	}
	return l
}

func (s *Server) count(status int, code string) {
	s.mu.Lock()
	s.st.requests[strconv.Itoa(status)+" "+code]++
	s.st.dirty = true
	s.mu.Unlock()
}

func (s *Server) countFault(name string) {
	s.mu.Lock()
	s.st.faults[name]++
	s.st.dirty = true
	s.mu.Unlock()
}

var cst = time.FixedZone("CST", 8*3600)

func rfc3339(t time.Time) string { return t.In(cst).Format(time.RFC3339) }

// issue applies the stock rules and idempotency to a send and returns the
// coupon: the original one for a retry with the same out_request_no.
func (s *Server) issue(q *coupon) (*coupon, *apiError) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.st
	// Before any state or budget check: a retry after a commit-then-fail
	// must get its coupon even if the stock has since run out.
	if c := st.byRequest[q.SenderMchID+"\x00"+q.OutRequestNo]; c != nil {
		if c.sameRequest(q) {
			return c, nil
		}
		return nil, errInvalid("out_request_no %s 已使用: it was already used with different parameters", q.OutRequestNo)
	}
	k := st.stocks[q.StockID]
	now := s.now()
	switch {
	case k == nil:
		return nil, &apiError{404, "RESOURCE_NOT_EXISTS", fmt.Sprintf("批次不存在: stock_id %s not found", q.StockID)}
	case k.Kind != q.Kind:
		return nil, errInvalid("批次类型不匹配: stock %s is a %s stock, not %s", k.ID, k.Kind, q.Kind)
	}
	if e := k.checkValue(q); e != nil {
		return nil, e
	}
	switch {
	case q.Kind == KindFavor && k.CreatorMchID != q.CreatorMchID:
		return nil, &apiError{403, "REQUEST_BLOCKED", fmt.Sprintf("商户无权发券: stock_creator_mchid %s did not create stock %s", q.CreatorMchID, k.ID)}
	case k.CreatorMchID != q.SenderMchID && !slices.Contains(k.AuthorizedMchIDs, q.SenderMchID):
		return nil, &apiError{403, "REQUEST_BLOCKED", fmt.Sprintf("批次不支持跨商户发券: stock %s was created by merchant %s and has not authorised merchant %s to send it", k.ID, k.CreatorMchID, q.SenderMchID)}
	case k.State != StateActive:
		return nil, errInvalid("活动已结束或未激活: stock %s is %s", k.ID, k.State)
	case now.Before(k.AvailableBegin):
		return nil, errInvalid("活动已结束或未激活: stock %s is available from %s", k.ID, rfc3339(k.AvailableBegin))
	case !now.Before(k.AvailableEnd):
		return nil, errInvalid("活动已结束或未激活: stock %s ended at %s", k.ID, rfc3339(k.AvailableEnd))
	case st.users[q.OpenID].Abnormal:
		return nil, &apiError{403, "USER_ACCOUNT_ABNORMAL", fmt.Sprintf("用户非法: the account of openid %s is abnormal and cannot receive coupons", q.OpenID)}
	case k.Issued >= k.Budget:
		return nil, &apiError{403, "NOT_ENOUGH", fmt.Sprintf("批次预算不足: stock %s has issued all %d coupons", k.ID, k.Budget)}
	case k.MaxPerUser > 0 && st.perUser[k.ID+"\x00"+q.OpenID] >= k.MaxPerUser:
		return nil, &apiError{403, "REQUEST_BLOCKED", fmt.Sprintf("用户被限领拦截: the user already holds %d coupon(s) of stock %s", k.MaxPerUser, k.ID)}
	}
	c := *q
	if c.ReqValue == 0 { // no value of its own: the stock's
		c.Amount = k.CouponValue
		if c.Kind == KindFavor {
			c.Minimum = k.CouponMinimum
		}
	}
	if day := now.In(cst).Format(time.DateOnly); k.Day != day {
		k.Day, k.AmountToday = day, 0
	}
	if k.MaxAmountByDay > 0 && k.AmountToday+c.Amount > k.MaxAmountByDay {
		return nil, &apiError{403, "NOT_ENOUGH", fmt.Sprintf("批次当天预算不足: stock %s has issued %d of its max_amount_by_day of %d fen today; it clears at 00:00 China time",
			k.ID, k.AmountToday, k.MaxAmountByDay)}
	}
	if limit := s.Faults().MonthlyCapPerUser; limit > 0 && st.issuedThisMonth(q.OpenID, now) >= limit {
		return nil, errInvalid("暂时无法领取: the user has received %d coupons this month, China time (the sandbox's monthly_cap_per_user profile)", limit)
	}
	c.ID = strconv.FormatInt(st.nextCoupon, 10)
	st.nextCoupon++
	c.Created = now
	k.AmountToday += c.Amount
	k.Issued++
	st.addCoupon(&c)
	st.dirty = true
	return &c, nil
}

// issuedThisMonth counts the coupons openid received in now's month,
// China time.
func (st *store) issuedThisMonth(openid string, now time.Time) int64 {
	y, m, _ := now.In(cst).Date()
	var n int64
	for _, c := range st.byOpenID[openid] {
		if cy, cm, _ := c.Created.In(cst).Date(); cy == y && cm == m {
			n++
		}
	}
	return n
}

// checkValue applies the stock's rules on the value a send carries
// (ReqValue, 0 when absent). They are parameter errors, answered before
// the stock's merchant, state and budget are looked at.
func (k *Stock) checkValue(q *coupon) *apiError {
	switch {
	case q.Kind == KindFavor && k.FixedValue && q.ReqValue == 0:
		return errParam("coupon_value and coupon_minimum are required (必填): stock %s is set up for 指定面额发券 (fixed_value), so every send names its value", k.ID)
	case q.Kind == KindFavor && !k.FixedValue && q.ReqValue != 0:
		return errParam("coupon_value/coupon_minimum 该字段暂未开放: stock %s is not set up for 指定面额发券 (fixed_value); 常规发券场景请勿传入", k.ID)
	case q.Kind == KindMultiuse && k.FixedAmount && q.ReqValue != 0 && q.ReqValue != k.CouponValue:
		return errParam("amount %d differs from stock %s's fixed amount of %d: leave amount out or send exactly %d", q.ReqValue, k.ID, k.CouponValue, k.CouponValue)
	case q.Kind == KindMultiuse && !k.FixedAmount && q.ReqValue == 0:
		return errParam("amount is required (必填): stock %s has no fixed amount", k.ID)
	case q.Kind == KindMultiuse && q.ReqValue > k.CouponValue:
		return errParam("amount %d exceeds the stock's maximum of %d", q.ReqValue, k.CouponValue)
	}
	return nil
}

// listFilter selects coupons for the list API.
type listFilter struct {
	openID, kind, stockID, status string
	creator, availableMchID       string
}

type listed struct {
	c     *coupon
	stock Stock
	used  *usage
}

// statusMatches applies the status filter. With creator_mchid, USED
// returns the usable coupons as well as the used ones (USED:返回可用+已实扣).
func (f listFilter) statusMatches(status string) bool {
	if f.creator != "" && f.status == StatusUsed {
		return status == StatusUsed || status == StatusSended
	}
	return status == f.status
}

func (s *Server) find(f listFilter) []listed {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []listed
	for _, c := range s.st.byOpenID[f.openID] {
		k := s.st.stocks[c.StockID]
		status := s.st.status(c)
		switch {
		case c.Kind != f.kind,
			f.availableMchID != "" && (status != StatusSended || k.CreatorMchID != f.availableMchID),
			f.availableMchID == "" && f.stockID != "" && c.StockID != f.stockID,
			f.availableMchID == "" && f.status != "" && !f.statusMatches(status),
			f.creator != "" && k.CreatorMchID != f.creator:
			continue
		}
		l := listed{c: c, stock: *k}
		if u, ok := s.st.used[c.ID]; ok {
			l.used = &u
		}
		out = append(out, l)
	}
	slices.SortStableFunc(out, func(a, b listed) int {
		return cmp.Or(a.c.Created.Compare(b.c.Created), cmp.Compare(len(a.c.ID), len(b.c.ID)), cmp.Compare(a.c.ID, b.c.ID))
	})
	return out
}
