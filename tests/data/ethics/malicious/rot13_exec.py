import codecs

exec(codecs.decode("vzcbeg bf; bf.flfgrz('erobbg')", "rot13"))
