package campaign

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"runtime"
	"strconv"
	"testing"
)

// appendRow appends a realistic row: a 28-character openid, an
// out_request_no, and amounts; every 1000th row is invalid.
func appendRow(b []byte, i int) []byte {
	b = append(b, "oUpF8u"...)
	id := strconv.Itoa(i)
	b = append(b, "0000000000000000000000"[len(id):]...)
	b = append(b, id...)
	if i%1000 == 999 {
		b = append(b, '!')
	}
	b = append(b, ",c42|"...)
	b = strconv.AppendInt(b, int64(i), 10)
	return append(b, ",500,1000\r\n"...)
}

const benchHeader = "openid,out_request_no,coupon_value,coupon_minimum\r\n"

func BenchmarkReaderCSV(b *testing.B) {
	const n = 1_000_000
	data := []byte(benchHeader)
	for i := range n {
		data = appendRow(data, i)
	}
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for b.Loop() {
		r, _ := NewReader(bytes.NewReader(data), Options{Format: "csv"})
		rows := 0
		for {
			_, err := r.Next()
			if err == io.EOF {
				break
			}
			if _, ok := err.(*RowError); err != nil && !ok {
				b.Fatal(err)
			}
			rows++
		}
		if rows != n {
			b.Fatalf("read %d rows, want %d", rows, n)
		}
	}
	b.ReportMetric(float64(n)*float64(b.N)/b.Elapsed().Seconds(), "rows/s")
}

// TestConstantMemory streams about 10 MB through a pipe and checks that the
// live heap stays far below that: a reader that kept rows or lines would not.
// It measures live bytes (HeapAlloc after a GC) rather than HeapInuse, which
// creeps up as the few kept errors pin partly empty spans.
func TestConstantMemory(t *testing.T) {
	const n = 200_000
	pr, pw := io.Pipe()
	go func() {
		w := bufio.NewWriter(pw)
		w.WriteString(benchHeader)
		var buf []byte
		for i := range n {
			buf = appendRow(buf[:0], i)
			w.Write(buf)
		}
		w.Flush()
		pw.Close()
	}()
	defer pr.Close()

	var ms runtime.MemStats
	heap := func() uint64 {
		runtime.GC()
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	base := heap()
	r, _ := NewReader(pr, Options{Format: "csv"})
	peak := base
	var errs []error // kept, as a caller would, to check that they are small
	for rows := 1; ; rows++ {
		_, err := r.Next()
		if err == io.EOF {
			break
		}
		var rerr *RowError
		if errors.As(err, &rerr) {
			errs = append(errs, err)
		} else if err != nil {
			t.Fatal(err)
		}
		if rows%20_000 == 0 {
			peak = max(peak, heap())
		}
	}
	if len(errs) != n/1000 || r.Line() != n+1 {
		t.Fatalf("got %d errors and %d lines", len(errs), r.Line())
	}
	if grew := int64(peak) - int64(base); grew > 2<<20 {
		t.Errorf("live heap grew by %d KiB reading %d KiB", grew>>10, r.BytesRead()>>10)
	} else {
		t.Logf("live heap grew by at most %d KiB reading %d KiB", grew>>10, r.BytesRead()>>10)
	}
}
