package wechat

import (
	"context"
	"crypto/rsa"
	"fmt"
	"net/http"
	"net/url"
	"regexp"

	"github.com/wechatpay-apiv3/wechatpay-go/utils"
)

// Encryptor encrypts personal data for WeChat Pay: RSA-OAEP under the
// WeChat Pay public key, named by its key id. It needs no merchant secret,
// so a producer can encrypt before anything is stored or queued.
type Encryptor struct {
	keyID string
	key   *rsa.PublicKey
}

// NewEncryptor returns an Encryptor for the WeChat Pay public key keyID.
func NewEncryptor(keyID string, key *rsa.PublicKey) *Encryptor {
	return &Encryptor{keyID: keyID, key: key}
}

// KeyID names the key; requests carrying the ciphertext send it as
// Wechatpay-Serial.
func (e *Encryptor) KeyID() string { return e.keyID }

// EncryptedIdentity is a consumer-fund recipient's name and identity card
// number, encrypted. It is safe to store and log; the plaintext is not.
type EncryptedIdentity struct {
	UserName     string `json:"user_name"`
	IDCardNumber string `json:"id_card_number"`
	KeyID        string `json:"key_id"`
}

var idCardRE = regexp.MustCompile(`^[0-9]{17}[0-9Xx]$`)

// EncryptIdentity checks and encrypts a recipient's name and ID card
// number. Error messages name the field but never echo its value.
func (e *Encryptor) EncryptIdentity(userName, idCardNumber string) (EncryptedIdentity, error) {
	if userName == "" {
		return EncryptedIdentity{}, invalid("user_name is empty")
	}
	if len(userName) > 128 {
		return EncryptedIdentity{}, invalid("user_name is longer than 128 bytes")
	}
	if !idCardRE.MatchString(idCardNumber) {
		return EncryptedIdentity{}, invalid("id_card_number is not 17 digits followed by a digit or X")
	}
	name, err := utils.EncryptOAEPWithPublicKey(userName, e.key)
	if err != nil {
		return EncryptedIdentity{}, fmt.Errorf("wechatpay: encrypting user_name: %w", err)
	}
	id, err := utils.EncryptOAEPWithPublicKey(idCardNumber, e.key)
	if err != nil {
		return EncryptedIdentity{}, fmt.Errorf("wechatpay: encrypting id_card_number: %w", err)
	}
	return EncryptedIdentity{UserName: name, IDCardNumber: id, KeyID: e.keyID}, nil
}

// SendMultiuseRequest sends consumer funds (消费金) of a stock to a user.
type SendMultiuseRequest struct {
	OpenID       string
	StockID      string
	OutRequestNo string
	AppID        string // default: the client's appid
	// Amount in fen; 0 leaves it out, which a stock with a fixed amount
	// answers with that amount and any other stock refuses.
	Amount   int64
	CardType string // default ID_CARD, the only 证件类型 WeChat lists
	Identity EncryptedIdentity
}

// multiuseBody is the wire format; field order is fixed so that a retry
// sends the same bytes.
type multiuseBody struct {
	StockID      string `json:"stock_id"`
	OutRequestNo string `json:"out_request_no"`
	UserName     string `json:"user_name"`
	IDCardNumber string `json:"id_card_number"`
	Amount       int64  `json:"amount,omitempty"` // optional (发放面额, not 必填)
	AppID        string `json:"appid"`
	CardType     string `json:"card_type"`
}

// SendMultiuseCoupon sends consumer funds. The identity must have been
// encrypted under this client's WeChat Pay key.
func (c *Client) SendMultiuseCoupon(ctx context.Context, req SendMultiuseRequest) (*SendCouponResponse, error) {
	ctx, cancel := c.call(ctx)
	defer cancel()
	if req.AppID == "" {
		req.AppID = c.appID
	}
	if req.CardType == "" {
		req.CardType = "ID_CARD"
	}
	if err := req.Validate(c.encryptor.keyID); err != nil {
		return nil, err
	}
	body := multiuseBody{
		StockID: req.StockID, OutRequestNo: req.OutRequestNo,
		UserName: req.Identity.UserName, IDCardNumber: req.Identity.IDCardNumber,
		Amount: req.Amount, AppID: req.AppID, CardType: req.CardType,
	}
	// The SDK also sets Wechatpay-Serial to the key it verifies with, which
	// in public-key mode is this same key id; setting it here keeps the
	// request right should that ever differ.
	header := http.Header{}
	header.Set("Wechatpay-Serial", req.Identity.KeyID)
	path := apiHost + "/v3/multiuse/users/" + url.PathEscape(req.OpenID) + "/coupons"
	result, err := c.sdk.Request(ctx, http.MethodPost, path, header, nil, body, "application/json")
	if err != nil {
		return nil, classify(err, result)
	}
	var resp struct {
		CouponID string `json:"coupon_id"`
	}
	if err := decodeBody(result, &resp); err != nil {
		return nil, err
	}
	if resp.CouponID == "" {
		return nil, &Error{Class: Ambiguous, StatusCode: result.Response.StatusCode, Code: CodeBadResponse,
			Message: "response has no coupon_id", RequestID: requestID(result)}
	}
	return &SendCouponResponse{CouponID: resp.CouponID, RequestID: requestID(result)}, nil
}

// Validate checks the request; keyID is the WeChat Pay key the identity
// must be encrypted under.
func (r SendMultiuseRequest) Validate(keyID string) error {
	if err := validateSend(r.OpenID, r.StockID, r.OutRequestNo, r.AppID); err != nil {
		return err
	}
	if r.Amount < 0 {
		return invalid("amount must be positive, or 0 for the stock's fixed amount; got %d", r.Amount)
	}
	if r.CardType != "ID_CARD" {
		return invalid("card_type %q is not one WeChat accepts: ID_CARD is the only 证件类型", r.CardType)
	}
	if r.Identity.UserName == "" || r.Identity.IDCardNumber == "" {
		return invalid("user_name and id_card_number must be encrypted first (Encryptor.EncryptIdentity)")
	}
	if r.Identity.KeyID != keyID {
		return invalid("the identity was encrypted under key %q, but this merchant's WeChat Pay key is %q; encrypt it again",
			r.Identity.KeyID, keyID)
	}
	return nil
}
