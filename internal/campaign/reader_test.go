package campaign

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const allCols = "openid, out_request_no, coupon_value, coupon_minimum"

// readAll returns one entry per Next call until io.EOF or a fatal error:
// "LINE OPENID OUT_REQUEST_NO VALUE MINIMUM" for a row, the message for a
// row error; and the final error.
func readAll(t testing.TB, r *Reader) (got []string, end error) {
	t.Helper()
	for range 100_000 {
		row, err := r.Next()
		var rerr *RowError
		switch {
		case err == nil:
			got = append(got, fmt.Sprintf("%d %s %s %d %d", row.Line, row.OpenID, row.OutRequestNo, row.CouponValue, row.CouponMinimum))
		case errors.As(err, &rerr):
			got = append(got, err.Error())
		default:
			return got, err
		}
	}
	t.Fatal("Next never returned io.EOF")
	return nil, nil
}

func read(t *testing.T, input string, opts Options) ([]string, error) {
	t.Helper()
	r, err := NewReader(strings.NewReader(input), opts)
	if err != nil {
		t.Fatal(err)
	}
	return readAll(t, r)
}

var (
	id128  = strings.Repeat("a", 128)
	id129  = strings.Repeat("a", 129)
	quoted = strings.Repeat("a", 64) + "…" // how a 129-character value is quoted
)

func TestRows(t *testing.T) {
	tests := []struct {
		name   string
		format string
		input  string
		want   []string // rows and row errors, in order
		fatal  string   // the final error if not io.EOF
	}{
		// CSV: headers.
		{name: "all columns", format: "csv",
			input: "openid,out_request_no,coupon_value,coupon_minimum\no1,r1,100,200\n",
			want:  []string{"2 o1 r1 100 200"}},
		{name: "header in any order and case, spaced", format: "csv",
			input: " Coupon_Minimum , OPENID,coupon_value\n200,o1,100\n",
			want:  []string{"2 o1  100 200"}},
		{name: "openid only", format: "csv",
			input: "openid\no1\no2\n",
			want:  []string{"2 o1  0 0", "3 o2  0 0"}},
		{name: "unknown column", format: "csv",
			input: "open_id\no1\n",
			fatal: `input: line 1: unknown column "open_id"; expected ` + allCols},
		{name: "duplicate column", format: "csv",
			input: "openid,coupon_value,OpenID\no1,1,o1\n",
			fatal: `input: line 1: duplicate column "OpenID"; expected ` + allCols},
		{name: "no openid column", format: "csv",
			input: "out_request_no\nr1\n",
			fatal: `input: line 1: no openid column; expected ` + allCols},
		{name: "unnamed column", format: "csv",
			input: "openid,\no1,\n",
			fatal: `input: line 1: column 2 has no name; expected ` + allCols},
		{name: "header after blank lines", format: "csv",
			input: "\n\nopenid\no1\n",
			want:  []string{"4 o1  0 0"}},
		{name: "broken quote in header", format: "csv",
			input: "\"openid\no1\n",
			fatal: `input: line 1: the header is not valid CSV: extraneous or missing " in quoted-field at column 8; a quoted field must end on the line it starts`},

		// CSV: line structure.
		{name: "BOM", format: "csv",
			input: "\ufeffopenid\no1\n",
			want:  []string{"2 o1  0 0"}},
		{name: "CRLF", format: "csv",
			input: "openid,out_request_no\r\no1,r1\r\no2,r2\r\n",
			want:  []string{"2 o1 r1 0 0", "3 o2 r2 0 0"}},
		{name: "no newline at the end", format: "csv",
			input: "openid\r\no1\r\no2",
			want:  []string{"2 o1  0 0", "3 o2  0 0"}},
		{name: "quoted fields", format: "csv",
			input: "\"openid\",\"out_request_no\"\n\"o1\",\"r|1\"\n\"o,2\",x\n\"o\"\"3\",x\n\" o4 \",\"\"\n",
			want: []string{
				"2 o1 r|1 0 0",
				`line 3: openid "o,2": has a character outside letters, digits, _ and -`,
				`line 4: openid "o\"3": has a character outside letters, digits, _ and -`,
				"5 o4  0 0",
			}},
		{name: "quoted field spanning lines", format: "csv",
			input: "openid\n\"o1\no2\n",
			want: []string{
				`line 2: "\"o1": not valid CSV: extraneous or missing " in quoted-field at column 4; a quoted field must end on the line it starts`,
				"3 o2  0 0",
			}},
		{name: "bare quote", format: "csv",
			input: "openid\no\"1\n",
			want:  []string{`line 2: "o\"1": not valid CSV: bare " in non-quoted-field at column 2`}},
		{name: "blank lines and blank rows skipped", format: "csv",
			input: "openid,out_request_no\n\no1,r1\n   \n , \n\r\no2,r2\n\n",
			want:  []string{"3 o1 r1 0 0", "7 o2 r2 0 0"}},
		{name: "wrong number of fields", format: "csv",
			input: "openid,coupon_value,coupon_minimum\no1,1\no2,1,1,1\no3,1,1\n",
			want: []string{
				`line 2: "o1,1": has 2 fields, the header has 3`,
				`line 3: "o2,1,1,1": has 4 fields, the header has 3`,
				"4 o3  1 1",
			}},

		// Field rules, through CSV.
		{name: "openid missing", format: "csv",
			input: "openid,out_request_no\n,r1\n  ,r2\n",
			want:  []string{`line 2: openid: missing`, `line 3: openid: missing`}},
		{name: "openid characters", format: "csv",
			input: "openid\na b\no.1\n微信\no|1\n" + id128 + "\n-_Az09\n",
			want: []string{
				`line 2: openid "a b": has a character outside letters, digits, _ and -`,
				`line 3: openid "o.1": has a character outside letters, digits, _ and -`,
				`line 4: openid "微信": has a character outside letters, digits, _ and -`,
				`line 5: openid "o|1": has a character outside letters, digits, _ and -`,
				"6 " + id128 + "  0 0",
				"7 -_Az09  0 0",
			}},
		{name: "openid too long", format: "csv",
			input: "openid\n" + id129 + "\n",
			want:  []string{`line 2: openid "` + quoted + `": is 129 characters long; the limit is 128`}},
		{name: "out_request_no", format: "csv",
			input: "openid,out_request_no\no1,a|b*c-d_e9\no2,r/1\no3," + id129 + "\no4,\no5," + id128 + "\n",
			want: []string{
				"2 o1 a|b*c-d_e9 0 0",
				`line 3: out_request_no "r/1": has a character outside letters, digits, _, |, * and -`,
				`line 4: out_request_no "` + quoted + `": is 129 characters long; the limit is 128`,
				"5 o4  0 0",
				"6 o5 " + id128 + " 0 0",
			}},
		{name: "amounts", format: "csv",
			input: "openid,coupon_value,coupon_minimum\n" +
				"o1,-5,100\n" +
				"o2,1.5,100\n" +
				"o3,100,1000000000001\n" +
				"o4,abc,100\n" +
				"o5,100,\n" +
				"o6,,100\n" +
				"o7,500,499\n" +
				"o8,0,0\n" +
				"o9,+5,10\n" +
				"o10,1e3,1000\n" +
				"o11,100,99999999999999999999999\n" +
				"o12,1000000000000,1000000000000\n" +
				"o13,0100, 00200 \n" +
				"o14,500,500\n" +
				"o15,,\n" +
				"o16,10,-1.5\n" +
				"o17,1 000,2000\n",
			want: []string{
				`line 2: coupon_value "-5": is negative`,
				`line 3: coupon_value "1.5": has a decimal point; amounts are whole fen (1 yuan = 100 fen)`,
				`line 4: coupon_minimum "1000000000001": is more than 10^12 fen`,
				`line 5: coupon_value "abc": is not a whole number of fen`,
				`line 6: coupon_minimum: missing; coupon_value and coupon_minimum go together`,
				`line 7: coupon_value: missing; coupon_value and coupon_minimum go together`,
				`line 8: coupon_minimum "499": is less than coupon_value 500`,
				`line 9: coupon_value "0": must be more than 0`,
				`line 10: coupon_value "+5": has a sign; write digits only`,
				`line 11: coupon_value "1e3": is not a whole number of fen`,
				`line 12: coupon_minimum "99999999999999999999999": is more than 10^12 fen`,
				"13 o12  1000000000000 1000000000000",
				"14 o13  100 200",
				"15 o14  500 500",
				"16 o15  0 0",
				`line 17: coupon_minimum "-1.5": is negative`,
				`line 18: coupon_value "1 000": is not a whole number of fen`,
			}},

		// JSON lines.
		{name: "jsonl numbers", format: "jsonl",
			input: `{"openid":"o1","out_request_no":"r1","coupon_value":100,"coupon_minimum":200}` + "\n",
			want:  []string{"1 o1 r1 100 200"}},
		{name: "jsonl numeric strings, nulls, spaces, key case", format: "jsonl",
			input: `{"openid":" o1 ","coupon_value":"100","coupon_minimum":" 200 "}` + "\n" +
				`{"OpenID":"o2","out_request_no":null,"coupon_value":null,"coupon_minimum":null}` + "\n" +
				`  { "openid" : "o3" , "out_request_no" : "" }  ` + "\r\n",
			want: []string{"1 o1  100 200", "2 o2  0 0", "3 o3  0 0"}},
		{name: "jsonl blank lines", format: "jsonl",
			input: "\n" + `{"openid":"o1"}` + "\n \t\n\r\n" + `{"openid":"o2"}`,
			want:  []string{"2 o1  0 0", "5 o2  0 0"}},
		{name: "jsonl row errors", format: "jsonl",
			input: `{"openid":"o1","open_id":"x"}` + "\n" +
				`[1,2]` + "\n" +
				`"o2"` + "\n" +
				`{"openid":` + "\n" +
				`{"openid":"o3"} {"openid":"o4"}` + "\n" +
				`{"openid":5}` + "\n" +
				`{"openid":"o5","coupon_value":true,"coupon_minimum":1}` + "\n" +
				`{"openid":"o6","coupon_value":100.5,"coupon_minimum":200}` + "\n" +
				`{"openid":"o7","coupon_value":1e3,"coupon_minimum":2000}` + "\n" +
				`{"openid":"o8","coupon_value":-1,"coupon_minimum":2000}` + "\n" +
				`{"openid":"o9","OPENID":"o9"}` + "\n" +
				`{"openid":"o 10"}` + "\n" +
				`{"openid":"o11","coupon_value":"1.00","coupon_minimum":"2"}` + "\n" +
				`{"openid":"o12","coupon_value":5}` + "\n" +
				`{}` + "\n" +
				`{"openid":"o14","coupon_value":"x"}` + "\n" +
				`{"openid":"o13"}` + "\n",
			want: []string{
				`line 1: "open_id": unknown key; expected ` + allCols,
				`line 2: "[1,2]": not a JSON object`,
				`line 3: "\"o2\"": not a JSON object`,
				`line 4: "{\"openid\":": not valid JSON: unexpected end of JSON input (column 10)`,
				`line 5: "{\"openid\":\"o3\"} {\"openid\":\"o4\"}": not valid JSON: invalid character '{' after top-level value (column 17)`,
				`line 6: openid "5": must be a string`,
				`line 7: coupon_value "true": must be a number or a string of digits`,
				`line 8: coupon_value "100.5": has a decimal point; amounts are whole fen (1 yuan = 100 fen)`,
				`line 9: coupon_value "1e3": is not a whole number of fen`,
				`line 10: coupon_value "-1": is negative`,
				`line 11: "OPENID": repeated key`,
				`line 12: openid "o 10": has a character outside letters, digits, _ and -`,
				`line 13: coupon_value "1.00": has a decimal point; amounts are whole fen (1 yuan = 100 fen)`,
				`line 14: coupon_minimum: missing; coupon_value and coupon_minimum go together`,
				`line 15: openid: missing`,
				`line 16: coupon_value "x": is not a whole number of fen`,
				"17 o13  0 0",
			}},
		{name: "jsonl array file", format: "jsonl",
			input: "[\n" + `{"openid":"o1"}` + "\n]\n",
			fatal: "input is a JSON array, expected JSON lines (one object per line)"},

		// Whole-file problems.
		{name: "empty file", format: "csv", input: "",
			fatal: "no recipients in input: the file is empty"},
		{name: "only blank lines", format: "jsonl", input: "\n \r\n\n",
			fatal: "no recipients in input: the file is empty"},
		{name: "header only", format: "csv", input: "openid,coupon_value,coupon_minimum\n",
			fatal: "no recipients in input: it has a header row but no data rows"},
		{name: "header only, BOM and CRLF, no format", input: "\ufeffopenid\r\n\r\n",
			fatal: "no recipients in input: it has a header row but no data rows"},
		{name: "only invalid rows is not empty", format: "csv", input: "openid\na b\n",
			want: []string{`line 2: openid "a b": has a character outside letters, digits, _ and -`}},
		{name: "PNG", input: "\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01",
			fatal: "input looks binary (NUL byte at offset 8), expected CSV or JSON lines"},
		{name: "NUL in text", format: "jsonl", input: `{"openid":"o1"}` + "\n\x00\n",
			fatal: "input looks binary (NUL byte at offset 16), expected CSV or JSON lines"},
		{name: "GBK", format: "csv", input: "openid\no1,\xc4\xe3\xba\xc3\n",
			fatal: "input looks binary (invalid UTF-8 byte 0xc4 at offset 10), expected CSV or JSON lines in UTF-8"},
		{name: "UTF-16", format: "csv", input: "\xff\xfeo\x00p\x00e\x00n\x00i\x00d\x00",
			fatal: "input is UTF-16 text, expected CSV or JSON lines in UTF-8"},
		{name: "invalid UTF-8 after 8 KiB", format: "csv",
			input: "openid\n" + strings.Repeat("o1\n", 3000) + "o\xff2\no3\n",
			want: append(manyRows(2, 3000, "o1", ""),
				`line 3002: "o\xff2": not valid UTF-8 (column 2)`,
				"3003 o3  0 0")},
		{name: "rune cut by the 8 KiB window is fine", format: "csv",
			// The header and rows fill 8188 bytes, so the first é starts at 8191.
			input: " openid,out_request_no\n" + strings.Repeat("o1,r\n", 1633) + "o2," + strings.Repeat("é", 20) + "\n",
			want: append(manyRows(2, 1633, "o1", "r"),
				`line 1635: out_request_no "`+strings.Repeat("é", 20)+`": has a character outside letters, digits, _, |, * and -`)},

		// Long lines.
		{name: "csv line over 64 KiB", format: "csv",
			input: "openid\n" + strings.Repeat("a", 70000) + "\no2\n",
			want:  []string{`line 2: "` + quoted + `": line is longer than 64 KiB`, "3 o2  0 0"}},
		{name: "csv line of exactly 64 KiB", format: "csv",
			input: "openid\r\n" + strings.Repeat("a", 64<<10) + "\r\no2\r\n",
			want: []string{
				`line 2: openid "` + quoted + `": is 65536 characters long; the limit is 128`,
				"3 o2  0 0",
			}},
		{name: "csv line of 64 KiB + 1", format: "csv",
			input: "openid\r\n" + strings.Repeat("a", 64<<10+1) + "\r\no2\r\n",
			want:  []string{`line 2: "` + quoted + `": line is longer than 64 KiB`, "3 o2  0 0"}},
		{name: "long lines last and first", format: "jsonl",
			input: strings.Repeat(" ", 200000) + "\n" + `{"openid":"o2"}` + "\n" + strings.Repeat("x", 200000),
			want: []string{
				`line 1: "` + strings.Repeat(" ", 64) + `…": line is longer than 64 KiB`,
				"2 o2  0 0",
				`line 3: "` + strings.Repeat("x", 64) + `…": line is longer than 64 KiB`,
			}},
		{name: "header over 64 KiB", format: "csv",
			input: "openid," + strings.Repeat("a", 70000) + "\no1\n",
			fatal: "input: line 1: the header is longer than 64 KiB"},

		// Format choice.
		{name: "sniffed jsonl", input: "\ufeff\n  " + `{"openid":"o1"}` + "\n",
			want: []string{"2 o1  0 0"}},
		{name: "sniffed csv", input: "openid\no1\n",
			want: []string{"2 o1  0 0"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, end := read(t, tt.input, Options{Format: tt.format})
			if strings.Join(got, "\n") != strings.Join(tt.want, "\n") {
				t.Errorf("got\n\t%s\nwant\n\t%s", strings.Join(got, "\n\t"), strings.Join(tt.want, "\n\t"))
			}
			switch {
			case tt.fatal == "" && end != io.EOF:
				t.Errorf("ended with %v, want io.EOF", end)
			case tt.fatal != "" && (end == nil || end.Error() != tt.fatal):
				t.Errorf("ended with %v, want %s", end, tt.fatal)
			}
		})
	}
}

func manyRows(first, n int, openid, outRequestNo string) []string {
	var rows []string
	for i := range n {
		rows = append(rows, fmt.Sprintf("%d %s %s 0 0", first+i, openid, outRequestNo))
	}
	return rows
}

func TestRowsAroundErrors(t *testing.T) {
	var in strings.Builder
	var want []int
	wantErrs := 0
	in.WriteString("openid,out_request_no,coupon_value,coupon_minimum\r\n")
	for line := 2; line < 2000; line++ {
		switch line % 7 {
		case 0:
			fmt.Fprintf(&in, "bad id,r%d,100,200\r\n", line)
			wantErrs++
		case 3:
			in.WriteString("\r\n")
		case 5:
			fmt.Fprintf(&in, "o%d,r%d,300,200\r\n", line, line)
			wantErrs++
		default:
			fmt.Fprintf(&in, "o%d,r%d,100,200\r\n", line, line)
			want = append(want, line)
		}
	}
	r, _ := NewReader(strings.NewReader(in.String()), Options{})
	var rows, errs int
	for {
		row, err := r.Next()
		if err == io.EOF {
			break
		}
		var rerr *RowError
		if errors.As(err, &rerr) {
			if rerr.Line%7 != 0 && rerr.Line%7 != 5 {
				t.Errorf("unexpected error %v", err)
			}
			if r.Line() != rerr.Line {
				t.Errorf("Line() = %d after an error on line %d", r.Line(), rerr.Line)
			}
			errs++
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		if rows >= len(want) || row.Line != want[rows] {
			t.Fatalf("row %d: got line %d", rows, row.Line)
		}
		if row.OpenID != fmt.Sprint("o", row.Line) || row.OutRequestNo != fmt.Sprint("r", row.Line) {
			t.Errorf("line %d: got %+v", row.Line, row)
		}
		rows++
	}
	if rows != len(want) || errs != wantErrs {
		t.Errorf("got %d rows and %d errors, want %d and %d", rows, errs, len(want), wantErrs)
	}
	if r.BytesRead() != int64(in.Len()) || r.Line() != 1999 {
		t.Errorf("BytesRead() = %d, Line() = %d; want %d, 1999", r.BytesRead(), r.Line(), in.Len())
	}
}

func TestErrorsAreSticky(t *testing.T) {
	for _, input := range []string{"open_id\no1\n", "", "openid\no1\n"} {
		r, _ := NewReader(strings.NewReader(input), Options{Format: "csv"})
		_, first := readAll(t, r)
		for range 3 {
			if _, err := r.Next(); err != first {
				t.Errorf("%q: Next after %v returned %v", input, first, err)
			}
		}
	}
}

type failingReader struct{ data string }

func (f *failingReader) Read(p []byte) (int, error) {
	if f.data == "" {
		return 0, errors.New("disk on fire")
	}
	n := copy(p, f.data)
	f.data = f.data[n:]
	return n, nil
}

func TestIOError(t *testing.T) {
	// An error within the first 8 KiB comes before any row, as the start
	// of the file is examined first.
	for _, rows := range []int{1, 10000} {
		r, _ := NewReader(&failingReader{"openid\n" + strings.Repeat("o1\n", rows)}, Options{Name: "c.csv"})
		got, end := readAll(t, r)
		want := 0
		if rows > 8<<10/3 {
			want = rows
		}
		if len(got) != want || end == nil || end.Error() != "reading c.csv: disk on fire" {
			t.Errorf("%d rows: got %d rows, %v", rows, len(got), end)
		}
	}
}

func TestFormatChoice(t *testing.T) {
	const jsonl = `{"openid":"o1"}` + "\n"
	for _, tt := range []struct {
		name, format, input string
		ok                  bool
	}{
		{"x.ndjson", "", jsonl, true},
		{"x.JSON", "", jsonl, true},
		{"x.jsonl", "", jsonl, true},
		{"x.CSV", "", jsonl, false}, // the extension wins over the content
		{"x.txt", "", jsonl, true},
		{"x.jsonl", "CSV", jsonl, false},
	} {
		r, err := NewReader(strings.NewReader(tt.input), Options{Name: tt.name, Format: tt.format})
		if err != nil {
			t.Fatal(err)
		}
		_, err = r.Next()
		if (err == nil) != tt.ok {
			t.Errorf("%s, format %q: got %v", tt.name, tt.format, err)
		}
	}
	if _, err := NewReader(strings.NewReader(""), Options{Format: "xlsx"}); err == nil ||
		err.Error() != `unknown format "xlsx" for input; expected csv or jsonl` {
		t.Errorf("format xlsx: got %v", err)
	}
}

func TestOpen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "list.data")
	if err := os.WriteFile(path, []byte("{\"openid\":\"o1\"}\n{\"openid\":\"o 2\"}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	r, c, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got, end := readAll(t, r)
	want := []string{"1 o1  0 0", `line 2: openid "o 2": has a character outside letters, digits, _ and -`}
	if strings.Join(got, "\n") != strings.Join(want, "\n") || end != io.EOF {
		t.Errorf("got %q, %v", got, end)
	}
	if _, _, err := Open(filepath.Join(t.TempDir(), "missing.csv"), Options{}); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: got %v", err)
	}
	os.WriteFile(path, nil, 0o600)
	r, c, _ = Open(path, Options{Name: "campaign 7"})
	defer c.Close()
	if _, err := r.Next(); err == nil || err.Error() != "no recipients in campaign 7: the file is empty" {
		t.Errorf("empty file: got %v", err)
	}
}

func TestRowErrorMessage(t *testing.T) {
	for _, tt := range []struct {
		e    RowError
		want string
	}{
		{RowError{12, "openid", "a b", "has a character outside letters, digits, _ and -"}, `line 12: openid "a b": has a character outside letters, digits, _ and -`},
		{RowError{3, "openid", "", "missing"}, `line 3: openid: missing`},
		{RowError{4, "", "x,y", "has 2 fields, the header has 1"}, `line 4: "x,y": has 2 fields, the header has 1`},
		{RowError{5, "", "", "line is longer than 64 KiB"}, `line 5: line is longer than 64 KiB`},
	} {
		if got := tt.e.Error(); got != tt.want {
			t.Errorf("got %s, want %s", got, tt.want)
		}
	}
}

func TestPeekRefusesBeforeAnythingIsRead(t *testing.T) {
	r, err := NewReader(strings.NewReader("openid\no1\no2\n"), Options{Format: "csv"})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Peek(); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"o1", "o2"} {
		row, err := r.Next()
		if err != nil || row.OpenID != want {
			t.Fatalf("after Peek: %+v %v, want %s", row, err, want)
		}
	}
	for name, input := range map[string]string{"header only": "openid,out_request_no\n", "wrong header": "open_id\nx\n", "empty": ""} {
		r, err := NewReader(strings.NewReader(input), Options{Format: "csv"})
		if err == nil {
			err = r.Peek()
		}
		if err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	r, _ = NewReader(strings.NewReader("openid\nbad id\no2\n"), Options{Format: "csv"})
	if err := r.Peek(); err != nil {
		t.Fatalf("an invalid first row refused the file: %v", err)
	}
}
