package campaign

import (
	"bytes"
	"errors"
	"io"
	"regexp"
	"testing"
	"unicode/utf8"
)

// Written apart from the package's own checks, so that a bug there is not
// repeated here.
var (
	validOpenID       = regexp.MustCompile(`^[A-Za-z0-9_-]{1,128}$`)
	validOutRequestNo = regexp.MustCompile(`^[A-Za-z0-9_|*-]{1,128}$`)
)

func FuzzReader(f *testing.F) {
	for _, seed := range []string{
		"openid,out_request_no,coupon_value,coupon_minimum\no1,r1,100,200\n",
		"\ufeffOPENID , coupon_minimum,coupon_value\r\n\"o1\",200,100\r\n\r\n,,\r\no 2,1,2\r\n",
		"openid\n\"o1\n\"o\"\"2\",x\no3",
		"openid,coupon_value,coupon_minimum\no1,-1,1.5\no2,1e3,99999999999999999999\n",
		`{"openid":"o1","out_request_no":"r|*1","coupon_value":100,"coupon_minimum":"200"}` + "\n\n" + `{"OpenID":null,"x":1}` + "\n[1]\n",
		`{"openid":"o1","coupon_value":1.5e2,"coupon_minimum":-0}` + "\n" + `{"openid":"\u00e9"}`,
		"[\n{}\n]",
		"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
		"openid\no\xff1\n",
		"",
	} {
		for format := range uint8(3) {
			f.Add([]byte(seed), format)
		}
	}
	f.Fuzz(func(t *testing.T, data []byte, format uint8) {
		r, err := NewReader(bytes.NewReader(data), Options{Format: [...]string{"", "csv", "jsonl"}[format%3]})
		if err != nil {
			t.Fatal(err)
		}
		prev := 0
		for calls := 0; ; calls++ {
			// Each call consumes a line or ends the read.
			if calls > bytes.Count(data, []byte("\n"))+2 {
				t.Fatalf("no end after %d calls", calls)
			}
			row, err := r.Next()
			if err == io.EOF {
				if r.BytesRead() != int64(len(data)) {
					t.Fatalf("BytesRead() = %d at EOF, want %d", r.BytesRead(), len(data))
				}
				return
			}
			var rerr *RowError
			if err != nil && !errors.As(err, &rerr) {
				if _, again := r.Next(); again != err {
					t.Fatalf("fatal %v followed by %v", err, again)
				}
				return
			}
			line := row.Line
			if rerr != nil {
				line = rerr.Line
				if row != (Row{}) || utf8.RuneCountInString(rerr.Value) > 65 || rerr.Reason == "" {
					t.Fatalf("bad row error %+v with row %+v", rerr, row)
				}
			}
			if line <= prev || line != r.Line() {
				t.Fatalf("line %d after line %d, Line() = %d", line, prev, r.Line())
			}
			prev = line
			if rerr != nil {
				continue
			}
			amountsOK := row.CouponValue == 0 && row.CouponMinimum == 0 ||
				0 < row.CouponValue && row.CouponValue <= row.CouponMinimum && row.CouponMinimum <= 1e12
			if !validOpenID.MatchString(row.OpenID) || row.OutRequestNo != "" && !validOutRequestNo.MatchString(row.OutRequestNo) || !amountsOK {
				t.Fatalf("invalid row returned: %+v", row)
			}
		}
	})
}
