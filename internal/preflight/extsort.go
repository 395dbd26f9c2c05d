package preflight

import (
	"bufio"
	"bytes"
	"container/heap"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
)

// sorter sorts fixed-size records in bounded memory: up to chunk records
// are sorted in memory; beyond that, sorted runs are spilled to files in
// dir and merged, fanIn at a time, so that neither memory nor open files
// grow with the input.
type sorter struct {
	size  int // bytes per record
	chunk int // records held in memory
	fanIn int // runs merged at once
	dir   string
	buf   []byte
	runs  []string
}

func newSorter(dir string, size, chunk int) *sorter {
	return &sorter{size: size, chunk: chunk, fanIn: 64, dir: dir, buf: make([]byte, 0, size*chunk)}
}

func (s *sorter) add(rec []byte) error {
	if len(rec) != s.size {
		return fmt.Errorf("preflight: a record of %d bytes in a sorter of %d", len(rec), s.size)
	}
	if len(s.buf) == cap(s.buf) {
		if err := s.spill(); err != nil {
			return err
		}
	}
	s.buf = append(s.buf, rec...)
	return nil
}

// sortBuf sorts the records in buf in place.
func (s *sorter) sortBuf() {
	n := len(s.buf) / s.size
	recs := make([][]byte, n)
	for i := range recs {
		recs[i] = s.buf[i*s.size : (i+1)*s.size]
	}
	slices.SortFunc(recs, bytes.Compare)
	out := make([]byte, 0, len(s.buf))
	for _, r := range recs {
		out = append(out, r...)
	}
	copy(s.buf, out)
}

func (s *sorter) spill() error {
	s.sortBuf()
	f, err := os.CreateTemp(s.dir, "run-")
	if err != nil {
		return fmt.Errorf("preflight: spilling sorted records: %w", err)
	}
	_, werr := f.Write(s.buf)
	if cerr := f.Close(); werr == nil {
		werr = cerr
	}
	if werr != nil {
		return fmt.Errorf("preflight: spilling sorted records: %w", werr)
	}
	s.runs = append(s.runs, f.Name())
	s.buf = s.buf[:0]
	return nil
}

// each calls fn with every record in sorted order; the slice is only
// valid during the call. The sorter is spent afterwards.
func (s *sorter) each(fn func(rec []byte) error) error {
	if len(s.runs) == 0 {
		s.sortBuf()
		for i := 0; i < len(s.buf); i += s.size {
			if err := fn(s.buf[i : i+s.size]); err != nil {
				return err
			}
		}
		return nil
	}
	if len(s.buf) > 0 {
		if err := s.spill(); err != nil {
			return err
		}
	}
	s.buf = nil // the memory goes to the merge's readers
	for len(s.runs) > s.fanIn {
		f, err := os.CreateTemp(s.dir, "run-")
		if err != nil {
			return err
		}
		w := bufio.NewWriter(f)
		err = s.merge(s.runs[:s.fanIn], func(rec []byte) error { _, err := w.Write(rec); return err })
		if err == nil {
			err = w.Flush()
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("preflight: merging sorted runs: %w", err)
		}
		s.runs = append(s.runs[s.fanIn:], f.Name())
	}
	return s.merge(s.runs, fn)
}

// merge streams the sorted runs as one sorted sequence, and removes them.
func (s *sorter) merge(runs []string, fn func([]byte) error) error {
	h := &runHeap{}
	defer func() {
		for _, r := range h.items {
			r.f.Close()
		}
		for _, name := range runs {
			os.Remove(name)
		}
	}()
	for _, name := range runs {
		f, err := os.Open(name)
		if err != nil {
			return err
		}
		r := &run{f: f, rd: bufio.NewReaderSize(f, 16<<10), rec: make([]byte, s.size)}
		ok, err := r.next()
		if err != nil {
			f.Close()
			return err
		}
		if !ok {
			f.Close()
			continue
		}
		h.items = append(h.items, r)
	}
	heap.Init(h)
	for h.Len() > 0 {
		r := h.items[0]
		if err := fn(r.rec); err != nil {
			return err
		}
		ok, err := r.next()
		if err != nil {
			return err
		}
		if ok {
			heap.Fix(h, 0)
		} else {
			r.f.Close()
			heap.Pop(h)
		}
	}
	return nil
}

type run struct {
	f   *os.File
	rd  *bufio.Reader
	rec []byte
}

func (r *run) next() (bool, error) {
	_, err := io.ReadFull(r.rd, r.rec)
	if errors.Is(err, io.EOF) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("preflight: reading a sorted run: %w", err)
	}
	return true, nil
}

type runHeap struct{ items []*run }

func (h *runHeap) Len() int           { return len(h.items) }
func (h *runHeap) Less(i, j int) bool { return bytes.Compare(h.items[i].rec, h.items[j].rec) < 0 }
func (h *runHeap) Swap(i, j int)      { h.items[i], h.items[j] = h.items[j], h.items[i] }
func (h *runHeap) Push(x any)         { h.items = append(h.items, x.(*run)) }
func (h *runHeap) Pop() any {
	last := h.items[len(h.items)-1]
	h.items = h.items[:len(h.items)-1]
	return last
}
