module github.com/couponflow/dispatcher

go 1.26.8

require (
	github.com/wechatpay-apiv3/wechatpay-go v0.2.21 // indirect
	golang.org/x/time v0.14.0 // indirect
)
