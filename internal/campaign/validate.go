package campaign

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"
)

type field int

const (
	openID field = iota
	outRequestNo
	couponValue
	couponMinimum
	numFields
)

var fieldNames = [numFields]string{"openid", "out_request_no", "coupon_value", "coupon_minimum"}

var fieldList = strings.Join(fieldNames[:], ", ")

func lookupField(name string) (field, bool) {
	for f, n := range fieldNames {
		if strings.EqualFold(name, n) {
			return field(f), true
		}
	}
	return 0, false
}

const (
	maxIDLen  = 128
	maxAmount = 1_000_000_000_000 // fen; far above any real coupon, well inside int64
	maxQuoted = 64                // characters of a value quoted in a message
)

// fields holds one row's values as found in the file, trimmed; an empty
// value counts as absent.
type fields [numFields]string

func (f *fields) set(k field, s string) { f[k] = strings.TrimSpace(s) }

func (f *fields) validate() (Row, *RowError) {
	bad := func(k field, reason string) (Row, *RowError) {
		return Row{}, &RowError{Field: fieldNames[k], Value: cut(f[k]), Reason: reason}
	}
	if f[openID] == "" {
		return bad(openID, "missing")
	}
	if reason := checkID(f[openID], openIDChars, "letters, digits, _ and -"); reason != "" {
		return bad(openID, reason)
	}
	if f[outRequestNo] != "" {
		if reason := checkID(f[outRequestNo], outRequestNoChars, "letters, digits, _, |, * and -"); reason != "" {
			return bad(outRequestNo, reason)
		}
	}
	row := Row{OpenID: f[openID], OutRequestNo: f[outRequestNo]}
	// A value given is checked before the pair is: "x" is the error to
	// report, not its missing partner.
	var reason string
	if f[couponValue] != "" {
		if row.CouponValue, reason = parseFen(f[couponValue]); reason != "" {
			return bad(couponValue, reason)
		}
		if row.CouponValue == 0 {
			return bad(couponValue, "must be more than 0")
		}
	}
	if f[couponMinimum] != "" {
		if row.CouponMinimum, reason = parseFen(f[couponMinimum]); reason != "" {
			return bad(couponMinimum, reason)
		}
	}
	switch v, m := f[couponValue], f[couponMinimum]; {
	case v == "" && m == "":
		return row, nil
	case v == "":
		return bad(couponValue, "missing; coupon_value and coupon_minimum go together")
	case m == "":
		return bad(couponMinimum, "missing; coupon_value and coupon_minimum go together")
	}
	if row.CouponMinimum < row.CouponValue {
		return bad(couponMinimum, fmt.Sprintf("is less than coupon_value %d", row.CouponValue))
	}
	return row, nil
}

// checkID returns why s is not a valid identifier, or "".
func checkID(s string, chars *[256]bool, allowed string) string {
	// Every allowed character is one byte, so the byte length is the length
	// of any valid value; counting runes is only for the message.
	if len(s) > maxIDLen {
		if n := utf8.RuneCountInString(s); n > maxIDLen {
			return fmt.Sprintf("is %d characters long; the limit is %d", n, maxIDLen)
		}
	}
	for i := 0; i < len(s); i++ {
		if !chars[s[i]] {
			return "has a character outside " + allowed
		}
	}
	return ""
}

var (
	openIDChars = charset("_-")
	// WeChat's charset for out_request_no.
	outRequestNoChars = charset("_-|*")
)

func charset(extra string) *[256]bool {
	var t [256]bool
	for c := range t {
		t[c] = 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte(extra, byte(c)) >= 0
	}
	return &t
}

// parseFen parses a non-empty amount in fen, or returns why it is not one.
func parseFen(s string) (int64, string) {
	sign, body := byte(0), s
	if s[0] == '-' || s[0] == '+' {
		sign, body = s[0], s[1:]
	}
	digits, dots := 0, 0
	for i := 0; i < len(body); i++ {
		switch c := body[i]; {
		case '0' <= c && c <= '9':
			digits++
		case c == '.':
			dots++
		default:
			return 0, "is not a whole number of fen"
		}
	}
	switch {
	case digits == 0 || dots > 1:
		return 0, "is not a whole number of fen"
	case sign == '-':
		return 0, "is negative"
	case sign == '+':
		return 0, "has a sign; write digits only"
	case dots == 1:
		return 0, "has a decimal point; amounts are whole fen (1 yuan = 100 fen)"
	}
	var n int64
	for i := 0; i < len(body); i++ {
		// Stopping as soon as the limit is passed also keeps n from overflowing.
		if n = n*10 + int64(body[i]-'0'); n > maxAmount {
			return 0, "is more than 10^12 fen"
		}
	}
	return n, ""
}

// parseJSON reads one line of JSON lines. Keys match case-insensitively,
// as encoding/json matches struct fields, and a repeated key is an error
// rather than last-one-wins, since either value could be the intended one.
func parseJSON(line []byte) (fields, *RowError) {
	var f fields
	lineErr := func(reason string) (fields, *RowError) {
		return f, &RowError{Value: cut(string(line)), Reason: reason}
	}
	if err := json.Unmarshal(line, new(json.RawMessage)); err != nil {
		reason := "not valid JSON: " + strings.TrimPrefix(err.Error(), "json: ")
		var se *json.SyntaxError
		if errors.As(err, &se) {
			reason += fmt.Sprintf(" (column %d)", se.Offset)
		}
		return lineErr(reason)
	}
	if line = bytes.TrimSpace(line); line[0] != '{' {
		return lineErr("not a JSON object")
	}
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.UseNumber()
	dec.Token() // the '{', known to be there
	var seen [numFields]bool
	for dec.More() {
		tok, _ := dec.Token()
		key := tok.(string)
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return lineErr("not valid JSON: " + err.Error()) // unreachable: the line was checked
		}
		k, ok := lookupField(key)
		switch {
		case !ok:
			return f, &RowError{Value: cut(key), Reason: "unknown key; expected " + fieldList}
		case seen[k]:
			return f, &RowError{Value: cut(key), Reason: "repeated key"}
		}
		seen[k] = true
		switch raw[0] {
		case 'n': // null: absent
		case '"':
			var s string
			json.Unmarshal(raw, &s)
			f.set(k, s)
		default:
			if (raw[0] == '-' || '0' <= raw[0] && raw[0] <= '9') && (k == couponValue || k == couponMinimum) {
				f.set(k, string(raw))
				continue
			}
			want := "a string"
			if k == couponValue || k == couponMinimum {
				want = "a number or a string of digits"
			}
			return f, &RowError{Field: fieldNames[k], Value: cut(string(raw)), Reason: "must be " + want}
		}
	}
	return f, nil
}

// cut shortens s for a message, and copies it so that a kept error does not
// pin the whole line in memory.
func cut(s string) string {
	i, n := 0, 0
	for i < len(s) && n < maxQuoted {
		_, size := utf8.DecodeRuneInString(s[i:])
		i += size
		n++
	}
	if i == len(s) {
		return s
	}
	return strings.Clone(s[:i]) + "…"
}
