// Package preflight says, before anything is queued, what a campaign would
// do: it reads and validates the whole recipients file as the enqueuer
// would (in bounded memory: duplicates are found by sorting hashes on
// disk), and sets the result against the stock as WeChat describes it
// (its state, window, remaining budget and per-user limit) and the
// merchant's rate limit.
package preflight

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/couponflow/dispatcher/internal/campaign"
	"github.com/couponflow/dispatcher/internal/enqueue"
)

// FileReport is what a campaign file holds, counted as a real enqueue of a
// new campaign would count it.
type FileReport struct {
	Rows int64 `json:"rows"` // data rows read, valid or not
	// Valid is the sends a real run would queue: valid rows less
	// duplicates.
	Valid int64 `json:"valid"`
	// Duplicates are valid rows whose out_request_no (given, or derived
	// from the openid) an earlier row of the file already has.
	Duplicates int64 `json:"duplicates"`
	Invalid    int64 `json:"invalid"`
	// InvalidRows are the first invalid rows' messages, in file order.
	InvalidRows []string `json:"invalid_rows,omitempty"`
	// Openids is how many distinct openids the valid sends go to, and
	// PerOpenID how many openids get how many sends (key: sends), which
	// sets a per-user limit against the file.
	Openids   int64           `json:"openids"`
	PerOpenID map[int64]int64 `json:"-"`
}

// OverLimit is how many sends go beyond limit per openid (0: no limit):
// WeChat refuses them (用户被限领拦截), the user holding enough already.
func (f FileReport) OverLimit(limit int64) int64 {
	if limit <= 0 {
		return 0
	}
	var n int64
	for sends, openids := range f.PerOpenID {
		if sends > limit {
			n += (sends - limit) * openids
		}
	}
	return n
}

// ScanOptions tune Scan.
type ScanOptions struct {
	KeepInvalid int    // invalid rows kept for the report, default 20
	TempDir     string // where sorted runs go; default os.TempDir()
	// ChunkRecords is how many rows are sorted in memory at once (32
	// bytes each), default 128Ki: 4 MiB, and as much again while sorting.
	ChunkRecords int
}

const hashLen = 16 // bytes of SHA-256 kept per key: collisions are out of reach

// Scan reads every row of r, validates it as enqueue.Producer.Bulk would
// for campaign c (the same row checks, the same out_request_no for rows
// without one), and counts valid, duplicate and invalid rows. A file
// error (not a recipients file) is returned with what was counted so far.
func Scan(r *campaign.Reader, c enqueue.Campaign, opts ScanOptions) (FileReport, error) {
	if opts.KeepInvalid <= 0 {
		opts.KeepInvalid = 20
	}
	if opts.ChunkRecords <= 0 {
		opts.ChunkRecords = 128 << 10
	}
	if c.StockCreatorMchID == "" {
		c.StockCreatorMchID = c.MchID // as Bulk does
	}
	dir, err := os.MkdirTemp(opts.TempDir, "enqueuer-preflight-")
	if err != nil {
		return FileReport{}, fmt.Errorf("preflight: a directory for sorting: %w", err)
	}
	defer os.RemoveAll(dir)

	rep := FileReport{PerOpenID: map[int64]int64{}}
	invalid := func(msg string) {
		rep.Invalid++
		if len(rep.InvalidRows) < opts.KeepInvalid {
			rep.InvalidRows = append(rep.InvalidRows, msg)
		}
	}
	// Each valid row: the hash of its out_request_no, then of its openid.
	sends := newSorter(dir, 2*hashLen, opts.ChunkRecords)
	rec := make([]byte, 2*hashLen)
	var fileErr error
	for {
		row, err := r.Next()
		var rowErr *campaign.RowError
		if errors.As(err, &rowErr) {
			rep.Rows++
			invalid(rowErr.Error())
			continue
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			fileErr = err
			break
		}
		rep.Rows++
		args := c.Send(row)
		if err := args.Validate(); err != nil {
			// Bulk's words for a row enqueue refuses.
			invalid(fmt.Sprintf("line %d: %v", row.Line, err))
			continue
		}
		orn := sha256.Sum256([]byte(args.OutRequestNo))
		oid := sha256.Sum256([]byte(args.OpenID))
		copy(rec, orn[:hashLen])
		copy(rec[hashLen:], oid[:hashLen])
		if err := sends.add(rec); err != nil {
			return rep, err
		}
	}

	// Sorted by out_request_no, a duplicate follows its first row; the
	// openids of the sends that remain are sorted again to count them.
	users := newSorter(dir, hashLen, 2*opts.ChunkRecords)
	var prev []byte
	err = sends.each(func(r []byte) error {
		if prev != nil && string(r[:hashLen]) == string(prev) {
			rep.Duplicates++
			return nil
		}
		prev = append(prev[:0], r[:hashLen]...)
		rep.Valid++
		return users.add(r[hashLen:])
	})
	if err != nil {
		return rep, err
	}
	var run int64
	prev = nil
	err = users.each(func(r []byte) error {
		if prev != nil && string(r) == string(prev) {
			run++
			return nil
		}
		if run > 0 {
			rep.PerOpenID[run]++
		}
		prev = append(prev[:0], r...)
		rep.Openids++
		run = 1
		return nil
	})
	if run > 0 {
		rep.PerOpenID[run]++
	}
	if err != nil {
		return rep, err
	}
	return rep, fileErr
}
