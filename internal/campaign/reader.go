// Package campaign streams a campaign's recipients file and validates it row
// by row, so that a bad row is reported with its line number before anything
// is enqueued, and a ten-million-row file is read in constant memory.
//
// Two formats are read. CSV has a header row naming the columns (openid,
// required; out_request_no, coupon_value, coupon_minimum, optional), in any
// order and any case. JSON lines has one object per line with the same keys
// (matched case-insensitively); amounts may be numbers or strings of digits.
//
// The file is split into lines before it is parsed, which is what keeps line
// numbers exact and lets one over-long line be skipped instead of ending the
// read. The price is that a quoted CSV field cannot contain a newline: such
// a row is reported as an unterminated quote, and the line after it is read
// as a row of its own. Lines that are empty or hold only spaces, and CSV rows
// whose fields are all empty (a blank spreadsheet row), are skipped. An empty
// value is treated as absent, in CSV and in JSON alike.
package campaign

import (
	"bufio"
	"bytes"
	"encoding/csv"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"unicode/utf8"
)

const (
	maxLine  = 64 << 10 // longest line accepted, without its line end
	sniffLen = 8 << 10  // bytes examined for binary content and the format
)

// Row is one valid recipient.
type Row struct {
	Line          int // 1-based line number in the file
	OpenID        string
	OutRequestNo  string // "" when the file did not give one
	CouponValue   int64  // 0 when absent
	CouponMinimum int64
}

// RowError is an invalid row; reading can go on after it.
type RowError struct {
	Line   int
	Field  string // the column or key at fault; "" when it is the whole line
	Value  string // the offending value, cut to 64 characters
	Reason string
}

func (e *RowError) Error() string {
	subject := e.Field
	if e.Value != "" {
		if subject != "" {
			subject += " "
		}
		subject += fmt.Sprintf("%q", e.Value)
	}
	if subject == "" {
		return fmt.Sprintf("line %d: %s", e.Line, e.Reason)
	}
	return fmt.Sprintf("line %d: %s: %s", e.Line, subject, e.Reason)
}

// Options tune a Reader.
type Options struct {
	// Format is "csv", "jsonl", or "" to choose by the extension of Name
	// and, failing that, by the file's first non-blank byte.
	Format string
	// Name is the file's name in messages: by default "input", or the
	// path for Open.
	Name string
}

// Reader yields the rows of a recipients file one at a time.
type Reader struct {
	name    string
	format  string // "csv", "jsonl", or "" until sniffed
	br      *bufio.Reader
	started bool
	err     error // sticky: io.EOF or a fatal error

	line  int   // lines consumed
	bytes int64 // bytes consumed
	rows  int   // data rows seen, valid or not

	// CSV: each line is parsed on its own by one csv.Reader whose source
	// is reset to that line.
	src     bytes.Reader
	csv     *csv.Reader
	header  bool
	columns []field // header order
	// A row read by Peek, handed out by the next Next.
	peeked  bool
	peekRow Row
	peekErr error
}

// NewReader returns a Reader of r. It does no I/O: every problem with the
// file itself is reported by Next.
func NewReader(r io.Reader, opts Options) (*Reader, error) {
	name := opts.Name
	if name == "" {
		name = "input"
	}
	format := strings.ToLower(opts.Format)
	switch format {
	case "csv", "jsonl":
	case "":
		format = formatByExt(opts.Name)
	default:
		return nil, fmt.Errorf("unknown format %q for %s; expected csv or jsonl", opts.Format, name)
	}
	rd := &Reader{name: name, format: format, br: bufio.NewReaderSize(r, maxLine+2)}
	rd.csv = csv.NewReader(&rd.src)
	rd.csv.FieldsPerRecord = -1
	rd.csv.ReuseRecord = true
	return rd, nil
}

// Open opens the file at path; unless opts.Format says otherwise, the
// format follows the extension (.csv; .jsonl, .ndjson, .json).
func Open(path string, opts Options) (*Reader, io.Closer, error) {
	if opts.Name == "" {
		opts.Name = path
	}
	if opts.Format == "" {
		opts.Format = formatByExt(path)
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, err
	}
	r, err := NewReader(f, opts)
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	return r, f, nil
}

func formatByExt(name string) string {
	switch strings.ToLower(filepath.Ext(name)) {
	case ".csv":
		return "csv"
	case ".jsonl", ".ndjson", ".json":
		return "jsonl"
	}
	return ""
}

// Line returns the number of lines consumed so far.
func (r *Reader) Line() int { return r.line }

// BytesRead returns the number of bytes consumed so far, to measure progress
// against the file's size.
func (r *Reader) BytesRead() int64 { return r.bytes }

// Next returns the next valid row. For an invalid row it returns a
// *RowError, and the caller may go on. At the end it returns io.EOF. Any
// other error is fatal and is returned again by every later call.
func (r *Reader) Next() (Row, error) {
	if r.peeked {
		r.peeked = false
		return r.peekRow, r.peekErr
	}
	if r.err != nil {
		return Row{}, r.err
	}
	row, err := r.next()
	if _, ok := err.(*RowError); err != nil && !ok {
		r.err = err
	}
	return row, err
}

// Peek reads up to the first row, which the next Next returns, and says
// whether the input is a recipients file at all: a producer refuses one
// that is not (a wrong header, nothing but a header, a binary file, a
// directory) before it writes anything. An invalid row is no such error.
func (r *Reader) Peek() error {
	if !r.peeked {
		r.peekRow, r.peekErr = r.Next()
		r.peeked = true
	}
	if _, isRow := r.peekErr.(*RowError); r.peekErr != nil && !isRow {
		return r.peekErr
	}
	return nil
}

func (r *Reader) next() (Row, error) {
	if !r.started {
		r.started = true
		if err := r.start(); err != nil {
			return Row{}, err
		}
	}
	for {
		line, long, err := r.readLine()
		if err == io.EOF {
			return Row{}, r.atEOF()
		}
		if err != nil {
			return Row{}, fmt.Errorf("reading %s: %w", r.name, err)
		}
		needHeader := r.format == "csv" && !r.header
		if long {
			if needHeader {
				return Row{}, fmt.Errorf("%s: line %d: the header is longer than 64 KiB", r.name, r.line)
			}
			r.rows++
			return Row{}, &RowError{Line: r.line, Value: cut(string(line)), Reason: "line is longer than 64 KiB"}
		}
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		if !utf8.Valid(line) {
			if needHeader {
				return Row{}, fmt.Errorf("%s: line %d: the header is not valid UTF-8", r.name, r.line)
			}
			r.rows++
			return Row{}, &RowError{Line: r.line, Value: cut(string(line)), Reason: fmt.Sprintf("not valid UTF-8 (column %d)", invalidUTF8(line)+1)}
		}
		if needHeader {
			if err := r.readHeader(line); err != nil {
				return Row{}, err
			}
			continue
		}
		var f fields
		var rerr *RowError
		if r.format == "csv" {
			var blank bool
			if f, blank, rerr = r.parseCSV(line); blank {
				continue
			}
		} else {
			f, rerr = parseJSON(line)
		}
		r.rows++
		if rerr != nil {
			rerr.Line = r.line
			return Row{}, rerr
		}
		row, rerr := f.validate()
		if rerr != nil {
			rerr.Line = r.line
			return Row{}, rerr
		}
		row.Line = r.line
		return row, nil
	}
}

func (r *Reader) atEOF() error {
	switch {
	case r.rows > 0:
		return io.EOF
	case r.header:
		return fmt.Errorf("no recipients in %s: it has a header row but no data rows", r.name)
	default:
		return fmt.Errorf("no recipients in %s: the file is empty", r.name)
	}
}

// start rejects binary files, which would otherwise yield a row error for
// every "line" of garbage, picks the format and skips a BOM.
func (r *Reader) start() error {
	head, err := r.br.Peek(sniffLen)
	if err != nil && err != io.EOF {
		return fmt.Errorf("reading %s: %w", r.name, err)
	}
	if bytes.HasPrefix(head, []byte{0xff, 0xfe}) || bytes.HasPrefix(head, []byte{0xfe, 0xff}) {
		return fmt.Errorf("%s is UTF-16 text, expected CSV or JSON lines in UTF-8", r.name)
	}
	if i := bytes.IndexByte(head, 0); i >= 0 {
		return fmt.Errorf("%s looks binary (NUL byte at offset %d), expected CSV or JSON lines", r.name, i)
	}
	if i := invalidUTF8(head); i >= 0 && (len(head) < sniffLen || utf8.FullRune(head[i:])) {
		return fmt.Errorf("%s looks binary (invalid UTF-8 byte 0x%02x at offset %d), expected CSV or JSON lines in UTF-8", r.name, head[i], i)
	}
	if bom := []byte("\ufeff"); bytes.HasPrefix(head, bom) {
		r.br.Discard(len(bom))
		r.bytes += int64(len(bom))
		head = head[len(bom):]
	}
	first := byte(0)
	if t := bytes.TrimLeft(head, " \t\r\n"); len(t) > 0 {
		first = t[0]
	}
	if r.format == "" {
		r.format = "csv"
		if first == '{' {
			r.format = "jsonl"
		}
	}
	if r.format == "jsonl" && first == '[' {
		return fmt.Errorf("%s is a JSON array, expected JSON lines (one object per line)", r.name)
	}
	return nil
}

// invalidUTF8 returns the offset of the first byte of b that is not valid
// UTF-8, or -1.
func invalidUTF8(b []byte) int {
	for i := 0; i < len(b); {
		if b[i] < utf8.RuneSelf {
			i++
			continue
		}
		c, n := utf8.DecodeRune(b[i:])
		if c == utf8.RuneError && n == 1 {
			return i
		}
		i += n
	}
	return -1
}

// readLine returns the next line without its line end. For a line over
// maxLine it returns a copy of the line's start and long = true, having
// skipped the rest.
func (r *Reader) readLine() (line []byte, long bool, err error) {
	line, err = r.br.ReadSlice('\n')
	r.bytes += int64(len(line))
	if err == bufio.ErrBufferFull {
		line = bytes.Clone(line[:4*maxQuoted+4]) // enough for cut
		long = true
		for err == bufio.ErrBufferFull {
			var more []byte
			more, err = r.br.ReadSlice('\n')
			r.bytes += int64(len(more))
		}
	}
	if err == io.EOF && (len(line) > 0 || long) {
		err = nil
	}
	if err != nil {
		return nil, false, err
	}
	r.line++
	line = bytes.TrimSuffix(line, []byte("\n"))
	line = bytes.TrimSuffix(line, []byte("\r"))
	return line, long || len(line) > maxLine, nil
}

func (r *Reader) readHeader(line []byte) error {
	rec, err := r.parseCSVLine(line)
	if err != nil {
		return fmt.Errorf("%s: line %d: the header is not valid CSV: %v", r.name, r.line, err)
	}
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%s: line %d: %s; expected %s", r.name, r.line, fmt.Sprintf(format, args...), fieldList)
	}
	r.columns = make([]field, len(rec))
	var seen [numFields]bool
	for i, name := range rec {
		name = strings.TrimSpace(name)
		f, ok := lookupField(name)
		switch {
		case name == "":
			return bad("column %d has no name", i+1)
		case !ok:
			return bad("unknown column %q", name)
		case seen[f]:
			return bad("duplicate column %q", name)
		}
		seen[f] = true
		r.columns[i] = f
	}
	if !seen[openID] {
		return bad("no %s column", fieldNames[openID])
	}
	r.header = true
	return nil
}

func (r *Reader) parseCSVLine(line []byte) ([]string, error) {
	r.src.Reset(line)
	rec, err := r.csv.Read()
	if pe, ok := err.(*csv.ParseError); ok {
		hint := ""
		if errors.Is(pe.Err, csv.ErrQuote) {
			hint = "; a quoted field must end on the line it starts"
		}
		return nil, fmt.Errorf("%v at column %d%s", pe.Err, pe.Column, hint)
	}
	return rec, err
}

// parseCSV splits a data line; blank reports a row of empty fields, which
// is how spreadsheets save an empty row.
func (r *Reader) parseCSV(line []byte) (f fields, blank bool, rerr *RowError) {
	rec, err := r.parseCSVLine(line)
	if err != nil {
		return f, false, &RowError{Value: cut(string(line)), Reason: "not valid CSV: " + err.Error()}
	}
	blank = true
	for _, s := range rec {
		blank = blank && strings.TrimSpace(s) == ""
	}
	if blank {
		return f, true, nil
	}
	if len(rec) != len(r.columns) {
		return f, false, &RowError{Value: cut(string(line)), Reason: fmt.Sprintf("has %d fields, the header has %d", len(rec), len(r.columns))}
	}
	for i, s := range rec {
		f.set(r.columns[i], s)
	}
	return f, false, nil
}
