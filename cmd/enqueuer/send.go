package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/couponflow/dispatcher/internal/enqueue"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/tasks"
	"github.com/couponflow/dispatcher/internal/wechat"
)

func cmdSend(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	c := newFlags("send", "--openid ID --stock-id ID [flags]", stderr)
	kind := c.fs.String("kind", "coupon", "coupon (代金券) or multiuse (消费金); for multiuse the name and ID card number are read from standard input, one per line, so they never appear in a command line")
	openid := c.fs.String("openid", "", "recipient's openid")
	stock := c.fs.String("stock-id", "", "stock (批次) id")
	orn := c.fs.String("out-request-no", "", "out_request_no; default derived from the merchant, the campaign and the openid")
	creator := c.fs.String("creator-mchid", "", "stock_creator_mchid; default the merchant id")
	value := c.fs.Int64("coupon-value", 0, "coupon_value in fen, for stocks that take one per send")
	minimum := c.fs.Int64("coupon-minimum", 0, "coupon_minimum in fen, with --coupon-value")
	amount := c.fs.Int64("amount", 0, "consumer funds amount in fen (--kind multiuse); leave it out for a stock with a fixed amount")
	cardType := c.fs.String("card-type", "ID_CARD", "card_type (--kind multiuse)")
	campaignName := c.fs.String("campaign", "adhoc", "campaign the send belongs to")
	deadline := c.fs.String("deadline", "72h", "how long to keep retrying an exhausted budget: a duration or an RFC 3339 time")
	queue := c.fs.String("queue", tasks.DefaultQueue, "asynq queue")
	c.retryFlag()
	reopen := c.fs.Bool("reopen", false, "queue into a campaign that was cancelled")
	replicaTimeout := replicaFlag(c.fs)
	if err := c.parse(args); err != nil {
		return err
	}
	if err := need("--openid", *openid, "--stock-id", *stock, "--mchid or WECHATPAY_MCHID", c.wx.MchID, "--appid or WECHATPAY_APPID", c.wx.AppID); err != nil {
		return err
	}
	dl, err := parseDeadline(*deadline)
	if err != nil {
		return &exitError{code: 2, err: err}
	}
	if err := tasks.ValidateCampaign(*campaignName); err != nil {
		return &exitError{code: 2, err: err}
	}
	if *orn == "" {
		*orn = tasks.DeriveOutRequestNo(c.wx.MchID, *campaignName, *openid)
	}
	base := tasks.Common{V: tasks.Version, Campaign: *campaignName, MchID: c.wx.MchID, OpenID: *openid,
		StockID: *stock, OutRequestNo: *orn, AppID: c.wx.AppID, Deadline: dl}

	var task tasks.Args
	switch *kind {
	case "coupon":
		if *creator == "" {
			*creator = c.wx.MchID
		}
		task = tasks.SendCoupon{Common: base, StockCreatorMchID: *creator, CouponValue: *value, CouponMinimum: *minimum}
	case "multiuse":
		if err := need("--public-key or WECHATPAY_PUBLIC_KEY", c.wx.PublicKeyPath, "--public-key-id or WECHATPAY_PUBLIC_KEY_ID", c.wx.PublicKeyID); err != nil {
			return err
		}
		key, err := wechat.LoadPublicKey(c.wx.PublicKeyPath)
		if err != nil {
			return fmt.Errorf("%s: %w", wechat.EnvPublicKey, err)
		}
		name, idCard, err := readIdentity(os.Stdin)
		if err != nil {
			return &exitError{code: 2, err: err}
		}
		ident, err := wechat.NewEncryptor(c.wx.PublicKeyID, key).EncryptIdentity(name, idCard)
		if err != nil {
			return &exitError{code: 2, err: err}
		}
		task = tasks.SendMultiuse{Common: base, Amount: *amount, CardType: *cardType, Identity: ident}
	default:
		return &exitError{code: 2, err: fmt.Errorf("--kind %q: want coupon or multiuse", *kind)}
	}

	rdb, err := c.redis(ctx, 4)
	if err != nil {
		return err
	}
	defer rdb.Close()
	if err := refuseCancelled(ctx, c.store(rdb), *campaignName, *reopen, stderr); err != nil {
		return err
	}
	meta, err := c.store(rdb).SaveCampaign(ctx, idempotency.Campaign{Name: *campaignName, MchID: c.wx.MchID, Deadline: dl})
	if errors.Is(err, idempotency.ErrExpired) {
		return &exitError{code: 2, err: fmt.Errorf("%w.\nNothing was queued: once its records are gone its sends cannot be told from new ones. To send on purpose, give a new --campaign name", err)}
	}
	if err != nil {
		return err
	}
	// The campaign's first deadline holds for all its sends.
	switch t := task.(type) {
	case tasks.SendCoupon:
		t.Deadline = meta.Deadline
		task = t
	case tasks.SendMultiuse:
		t.Deadline = meta.Deadline
		task = t
	}
	res, err := c.producer(rdb, *queue).Enqueue(ctx, task)
	var inv *enqueue.InvalidError
	if errors.As(err, &inv) {
		return &exitError{code: 2, err: fmt.Errorf("refused: %v", inv.Err)}
	}
	if err != nil {
		return err
	}
	ack, err := c.acknowledger(ctx, rdb, *replicaTimeout)
	if err == nil {
		err = ack.Acknowledge(ctx)
	}
	if err != nil {
		return fmt.Errorf("%s written but %w; run the same command again", res.TaskID, err)
	}
	if res.Outcome == enqueue.Duplicate {
		fmt.Fprintf(stdout, "duplicate: %s is already %s; nothing queued\n", res.TaskID, res.State)
		return nil
	}
	fmt.Fprintf(stdout, "enqueued %s (out_request_no %s, queue %s)\n", res.TaskID, *orn, *queue)
	if ack.Enabled() {
		fmt.Fprintf(stdout, "acknowledged by %d replica(s)\n", ack.Replicas())
	}
	return nil
}

// readIdentity reads a name and an ID card number, one per line.
func readIdentity(r io.Reader) (name, idCard string, err error) {
	sc := bufio.NewScanner(r)
	var lines []string
	for len(lines) < 2 && sc.Scan() {
		lines = append(lines, strings.TrimSpace(sc.Text()))
	}
	if len(lines) < 2 {
		return "", "", errors.New("--kind multiuse reads the user's name and ID card number from standard input, one per line; got fewer than two lines")
	}
	return lines[0], lines[1], nil
}
