package hsm

import (
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
)

// errOAEPDecode is the one answer to every malformed OAEP block, so its cause leaks nothing.
var errOAEPDecode = errors.New("OAEP decoding failed")

// oaepSHA256Decode removes EME-OAEP padding (RFC 8017 §7.1.2, SHA-256, MGF1-SHA-256, empty
// label) from em, the raw RSA output for a modulus of k bytes. Like crypto/rsa it does the
// checks in constant time and reports one error for all of them.
func oaepSHA256Decode(em []byte, k int) ([]byte, error) {
	const hLen = sha256.Size
	if k < 2*hLen+2 || len(em) > k {
		return nil, errOAEPDecode
	}
	em = append(make([]byte, k-len(em), k), em...) // raw RSA may drop leading zeros
	lHash := sha256.Sum256(nil)
	firstByteIsZero := subtle.ConstantTimeByteEq(em[0], 0)
	seed, db := em[1:1+hLen], em[1+hLen:]
	mgf1XOR(seed, db)
	mgf1XOR(db, seed)
	lHashGood := subtle.ConstantTimeCompare(lHash[:], db[:hLen])
	// db = lHash ‖ PS (zeros) ‖ 0x01 ‖ M: find the 0x01 without branching on the data.
	lookingForIndex, index, invalid := 1, 0, 0
	rest := db[hLen:]
	for i := range rest {
		equals0 := subtle.ConstantTimeByteEq(rest[i], 0)
		equals1 := subtle.ConstantTimeByteEq(rest[i], 1)
		index = subtle.ConstantTimeSelect(lookingForIndex&equals1, i, index)
		lookingForIndex = subtle.ConstantTimeSelect(equals1, 0, lookingForIndex)
		invalid = subtle.ConstantTimeSelect(lookingForIndex&^equals0, 1, invalid)
	}
	if firstByteIsZero&lHashGood&^invalid&^lookingForIndex != 1 {
		return nil, errOAEPDecode
	}
	return bytes.Clone(rest[index+1:]), nil
}

// mgf1XOR XORs out with MGF1-SHA-256(seed).
func mgf1XOR(out, seed []byte) {
	var counter [4]byte
	var sum [sha256.Size]byte
	for done := 0; done < len(out); {
		h := sha256.New()
		h.Write(seed)
		h.Write(counter[:])
		done += subtle.XORBytes(out[done:], out[done:], h.Sum(sum[:0]))
		for i := 3; i >= 0; i-- {
			if counter[i]++; counter[i] != 0 {
				break
			}
		}
	}
}
