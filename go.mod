module github.com/couponflow/dispatcher

go 1.26.8
