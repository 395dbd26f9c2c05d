package sandbox

import (
	"cmp"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"slices"
	"strings"
)

// User is an openid the sandbox has been told about: the appid it belongs
// to (an openid is a user's id under one appid) and whether WeChat deems
// the account abnormal (USER_ACCOUNT_ABNORMAL, 用户非法).
//
// An openid never registered belongs to the sandbox's appid and is
// normal: tests and the demo make up openids freely, and each of them
// would otherwise need registering first.
type User struct {
	OpenID   string `json:"openid"`
	AppID    string `json:"appid"` // default: the sandbox's appid
	Abnormal bool   `json:"abnormal"`
}

// RegisterUser adds a user or replaces what the sandbox knows of it.
func (s *Server) RegisterUser(u User) (User, error) {
	u.AppID = cmp.Or(u.AppID, s.id.AppID)
	switch {
	case u.OpenID == "" || len(u.OpenID) > 128:
		return User{}, fmt.Errorf("openid must be 1 to 128 characters, got %d", len(u.OpenID))
	case strings.ContainsAny(u.OpenID, "/?#% "):
		return User{}, fmt.Errorf("openid %q has a character that cannot be part of the API path", u.OpenID)
	case len(u.AppID) > 128:
		return User{}, fmt.Errorf("appid must be at most 128 characters")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.st.users[u.OpenID] = u
	s.st.dirty = true
	return u, nil
}

// Users returns the registered users, by openid.
func (s *Server) Users() []User {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.st.userList()
}

func (st *store) userList() []User {
	out := make([]User, 0, len(st.users))
	for _, u := range st.users {
		out = append(out, u)
	}
	slices.SortFunc(out, func(a, b User) int { return cmp.Compare(a.OpenID, b.OpenID) })
	return out
}

// checkUser applies the openid/appid rule: appid must be the one the
// openid belongs to (该openid需要与接口传入中的appid有对应关系).
func (s *Server) checkUser(openid, appid string) *apiError {
	s.mu.Lock()
	u, ok := s.st.users[openid]
	s.mu.Unlock()
	owner := s.id.AppID
	if ok {
		owner = u.AppID
	}
	if owner != appid {
		return errInvalid("openid与appid不匹配: openid %s belongs to appid %s, not %s", openid, owner, appid)
	}
	return nil
}

// RegisterIdentity records that an id number belongs to a name, so that a
// consumer-fund send naming that id number with another name fails the
// real-name check. Only salted hashes are kept (the holder salt), never
// the name or the number, and nothing of either is logged or echoed.
func (s *Server) RegisterIdentity(name, idNumber string) error {
	switch {
	case strings.TrimSpace(name) == "":
		return fmt.Errorf("user_name is empty")
	case !idCardRe.MatchString(idNumber):
		return fmt.Errorf("id_card_number is not an 18-character ID card number (17 digits, then a digit or X)")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.st.identities[s.identityKey(idNumber)] = s.identityBinding(name, idNumber)
	s.st.dirty = true
	return nil
}

// checkIdentity is the real-name check: an id number registered with
// another name is refused. An unregistered id number passes, so that
// made-up identities keep working.
func (s *Server) checkIdentity(name, idNumber string) *apiError {
	s.mu.Lock()
	want, ok := s.st.identities[s.identityKey(idNumber)]
	s.mu.Unlock()
	if ok && !hmac.Equal([]byte(want), []byte(s.identityBinding(name, idNumber))) {
		return errInvalid("实名校验不通过: user_name and id_card_number do not belong to the same person")
	}
	return nil
}

// identityKey and identityBinding are keyed hashes (HMAC-SHA256 under
// the holder salt), each with its own prefix so that neither can be
// matched against the other or against a coupon's holder hash. The
// check digit X is compared case-insensitively, as an ID card has one.
func (s *Server) identityKey(idNumber string) string {
	return s.mac("identity-number\x00" + strings.ToUpper(idNumber))
}

func (s *Server) identityBinding(name, idNumber string) string {
	return s.mac("identity-binding\x00" + strings.TrimSpace(name) + "\x00" + strings.ToUpper(idNumber))
}

func (s *Server) mac(msg string) string {
	m := hmac.New(sha256.New, []byte(s.id.HolderSalt))
	m.Write([]byte(msg))
	return hex.EncodeToString(m.Sum(nil))
}
