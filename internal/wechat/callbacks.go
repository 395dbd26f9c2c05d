package wechat

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"strings"

	"github.com/wechatpay-apiv3/wechatpay-go/core"
	"github.com/wechatpay-apiv3/wechatpay-go/services/cashcoupons"
)

// EnvAPIv3Key names the file holding the merchant's APIv3 key (商户平台 →
// 账户中心 → API安全 → 设置APIv3密钥): the 32-byte key that decrypts
// notifications. Only the receiver needs it.
const EnvAPIv3Key = "WECHATPAY_APIV3_KEY"

// LoadAPIv3Key reads the APIv3 key from path. Errors name the variable and
// the path, never the content; a key of the wrong length is refused, since
// AEAD_AES_256_GCM needs exactly 32 bytes.
func LoadAPIv3Key(path string) (string, []string, error) {
	if strings.TrimSpace(path) == "" {
		return "", nil, fmt.Errorf("%s is not set: the path of the file holding the merchant's APIv3 key", EnvAPIv3Key)
	}
	info, err := os.Stat(path)
	if err != nil {
		return "", nil, fmt.Errorf("%s: cannot read %s: %w", EnvAPIv3Key, path, err)
	}
	var warnings []string
	if perm := info.Mode().Perm(); perm&0o077 != 0 {
		warnings = append(warnings, fmt.Sprintf("%s: %s is readable by group or others (mode %04o); run chmod 600 on it", EnvAPIv3Key, path, perm))
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", nil, fmt.Errorf("%s: cannot read %s: %w", EnvAPIv3Key, path, err)
	}
	key := strings.TrimSpace(string(b))
	if len(key) != 32 {
		return "", nil, fmt.Errorf("%s: %s holds %d bytes; an APIv3 key is 32", EnvAPIv3Key, path, len(key))
	}
	return key, warnings, nil
}

// Callback is a merchant's notification URL for cash-coupon events.
type Callback struct {
	MchID      string
	NotifyURL  string
	UpdateTime string // set by SetCallback only
}

// SetCallback sets the URL WeChat posts the merchant's cash-coupon events
// (COUPON.USE) to: 设置代金券消息通知地址, POST
// /v3/marketing/favor/callbacks, through the SDK's CallBackUrlApiService.
// Only the stocks' creator merchant can set it. WeChat wants an https URL
// without parameters; the sandbox takes http too.
func (c *Client) SetCallback(ctx context.Context, notifyURL string) (*Callback, error) {
	u, err := url.Parse(notifyURL)
	if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" || u.RawQuery != "" {
		return nil, invalid("notify_url %q must be an absolute https URL without parameters", notifyURL)
	}
	if len(notifyURL) > 256 {
		return nil, invalid("notify_url is %d characters; WeChat takes at most 256", len(notifyURL))
	}
	svc := cashcoupons.CallBackUrlApiService{Client: c.sdk}
	resp, result, err := svc.SetCallback(ctx, cashcoupons.SetCallbackRequest{
		Mchid: core.String(c.mchID), NotifyUrl: core.String(notifyURL), Switch: core.Bool(true),
	})
	if err != nil {
		return nil, classify(err, result)
	}
	cb := &Callback{MchID: c.mchID}
	if resp.NotifyUrl != nil {
		cb.NotifyURL = *resp.NotifyUrl
	}
	if resp.UpdateTime != nil {
		cb.UpdateTime = *resp.UpdateTime
	}
	return cb, nil
}

// QueryCallback returns the merchant's notification URL (查询代金券消息通知地址,
// GET /v3/marketing/favor/callbacks?mchid=…).
func (c *Client) QueryCallback(ctx context.Context) (*Callback, error) {
	svc := cashcoupons.CallBackUrlApiService{Client: c.sdk}
	resp, result, err := svc.QueryCallback(ctx, cashcoupons.QueryCallbackRequest{Mchid: core.String(c.mchID)})
	if err != nil {
		return nil, classify(err, result)
	}
	cb := &Callback{MchID: c.mchID}
	if resp.NotifyUrl != nil {
		cb.NotifyURL = *resp.NotifyUrl
	}
	if resp.Mchid != nil {
		cb.MchID = *resp.Mchid
	}
	return cb, nil
}
