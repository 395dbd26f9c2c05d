package wechat_test

import (
	"context"
	"fmt"
	"log"

	"github.com/couponflow/dispatcher/internal/sandbox"
	"github.com/couponflow/dispatcher/internal/wechat"
)

// A cash coupon sent twice under one out_request_no is issued once: WeChat
// answers the second call with the first coupon. That is what lets a
// worker send again after a timeout, when it cannot know whether the first
// call issued anything. The client here talks to the package's local
// sandbox; on the real API its config comes from wechat.ConfigFromEnv.
func ExampleClient_SendCoupon() {
	ctx := context.Background()
	client, err := wechat.New(ctx, configOf(sb.Env()))
	if err != nil {
		log.Fatal(err)
	}
	stock, err := sb.CreateStock(sandbox.StockSpec{Kind: "favor", Budget: 1000, CouponValue: 100, CouponMinimum: 100})
	if err != nil {
		log.Fatal(err)
	}
	req := wechat.SendCouponRequest{OpenID: unique("o"), StockID: stock.ID, OutRequestNo: unique("example-")}
	first, err := client.SendCoupon(ctx, req)
	if err != nil {
		log.Fatal(err)
	}
	again, err := client.SendCoupon(ctx, req)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("the same coupon:", again.CouponID == first.CouponID)

	coupons, err := client.ListAllUserCoupons(ctx, wechat.ListCouponsRequest{OpenID: req.OpenID, StockID: stock.ID, CreatorMchID: client.MchID()})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("the user's coupons:", len(coupons))
	for _, c := range coupons {
		fmt.Println(c.CouponID == first.CouponID, c.Status)
	}
	// Output:
	// the same coupon: true
	// the user's coupons: 1
	// true SENDED
}
