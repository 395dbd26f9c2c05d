package tasks_test

import (
	"fmt"
	"log"
	"time"

	"github.com/couponflow/dispatcher/internal/tasks"
)

// A producer builds one task per recipient. Its out_request_no is derived
// from the merchant, the campaign and the user, so a re-run of the same
// campaign file names the same sends, and neither the queue nor WeChat
// issues anything twice.
func ExampleNewTask() {
	send := tasks.SendCoupon{
		Common: tasks.Common{
			V: tasks.Version, Campaign: "spring-2026", MchID: "1900000109",
			OpenID: "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o", StockID: "9856000", AppID: "wxd678efh567hg6787",
			Deadline: time.Date(2026, 12, 31, 0, 0, 0, 0, time.UTC),
		},
		StockCreatorMchID: "1900000109",
	}
	send.OutRequestNo = tasks.DeriveOutRequestNo(send.MchID, send.Campaign, send.OpenID)
	task, err := tasks.NewTask(send)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(task.Type())
	fmt.Println(send.OutRequestNo)
	fmt.Println(send.Key().TaskID())
	// Output:
	// coupon:send
	// 1900000109-6c7bb59c34159046b4df1cf924b1ad51
	// send:1900000109:1900000109.6c7bb59c34159046b4df1cf924b1ad51
}

// A send WeChat would refuse is refused before anything is queued, with
// the field named.
func ExampleNewTask_refused() {
	send := tasks.SendCoupon{
		Common: tasks.Common{
			V: tasks.Version, Campaign: "spring-2026", MchID: "1900000109",
			OpenID: "oUpF8u MuAJO", StockID: "9856000", OutRequestNo: "1900000109-1",
			AppID: "wxd678efh567hg6787", Deadline: time.Date(2026, 12, 31, 0, 0, 0, 0, time.UTC),
		},
	}
	_, err := tasks.NewTask(send)
	fmt.Println(err)
	// Output:
	// wechatpay: permanent INVALID_ARGUMENT: openid "oUpF8u MuAJO" has a character outside letters, digits, _ and -
}
